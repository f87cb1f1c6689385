"""``nonlocalnet analyze SUBCOMMAND CHECKPOINT_OR_RUN_DIR [--out DIR] ...``.

Wire into the main parser with ``add_analyze_parser(subparsers)``; every subcommand sets ``func`` (a callable
taking the parsed namespace, returning the exit status). Exit status 2 with a one-line message for a
model without nonlocal blocks, a missing or unreadable checkpoint, a bad config, or data that cannot be
loaded (the message names the dataset and root the run's config points to).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_analyze_parser", "main"]

EXIT_ERROR = 2

SUBCOMMANDS = ("spectrum", "affinity", "attention", "filter", "dynamics", "cost", "report")


def _error(msg: str) -> None:
    print(f"nonlocalnet analyze: error: {msg}", file=sys.stderr, flush=True)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,32,32, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return dims


def _query(text: str) -> tuple[int, int]:
    from .attention import parse_query

    try:
        return parse_query(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from nonlocalnet.train import CheckpointError, ConfigError

    from .common import AnalysisError, default_out, load_config_only, load_run

    try:
        path = Path(args.path)
        if args.analysis == "report":
            from .report import write_report

            out = Path(args.out) if args.out else default_out(
                path if path.is_dir() else path.parent, "report")
            page = write_report(path, out, args.data_root, overrides=args.set, images=args.images,
                                iterations=args.iterations, device=args.device, memory=not args.no_memory)
            print(page)
            return 0
        if args.analysis == "cost" and path.suffix in (".yaml", ".yml"):
            loaded = load_config_only(path, args.set, device=args.device)
        else:
            loaded = load_run(path, args.set, device=args.device)
        out = Path(args.out) if args.out else default_out(loaded, args.analysis)
        if args.analysis == "spectrum":
            from .spectrum import run_spectrum

            data = run_spectrum(loaded, out, top=args.top, evolution=not args.no_evolution)
        elif args.analysis == "affinity":
            from .affinity_powers import run_affinity

            data = run_affinity(loaded, out, data_root=args.data_root, split=args.split, images=args.images,
                                max_power=args.powers, bins=args.bins)
        elif args.analysis == "attention":
            from .attention import run_attention

            data = run_attention(loaded, out, data_root=args.data_root, split=args.split, images=args.images,
                                 queries=args.query or None, top=args.top)
        elif args.analysis == "filter":
            from .graph_filter import run_filter

            data = run_filter(loaded, out, data_root=args.data_root, split=args.split, images=args.images,
                              points=args.points, use_data=not args.no_data)
        elif args.analysis == "dynamics":
            from .dynamics import run_dynamics

            data = run_dynamics(loaded, out, data_root=args.data_root, split=args.split, images=args.images,
                                iterations=args.iterations)
        elif args.analysis == "cost":
            from .cost import run_cost

            data = run_cost(loaded, out, input_shape=args.input_shape, batch=args.batch,
                            memory=not args.no_memory, device=args.device)
            print((out / "cost.md").read_text(), end="")
        else:  # pragma: no cover - argparse restricts the choices
            raise AnalysisError(f"unknown analysis {args.analysis!r}")
    except (AnalysisError, CheckpointError, ConfigError) as e:
        _error(str(e))
        return EXIT_ERROR
    for f in data.get("figures", []):
        print(f)
    print(out / f"{args.analysis}.json")
    return 0


def _common(p: argparse.ArgumentParser, what: str = "CHECKPOINT_OR_RUN_DIR") -> None:
    p.add_argument("path", metavar=what,
                   help="a run dir (uses last.safetensors, else best, else the latest epoch file) or a "
                        ".safetensors checkpoint written by `nonlocalnet train`")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/analysis/<subcommand>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's config (e.g. --set data.root=/data/cifar); repeatable")
    p.add_argument("--device", default="cpu", help="torch device for the forward passes (default cpu)")


def _data(p: argparse.ArgumentParser, images: int) -> None:
    p.add_argument("--data-root", default=None,
                   help="dataset root (default: data.root of the run's config; the 'demo' dataset needs none)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split to take samples from")
    p.add_argument("--images", type=int, default=images, help=f"number of samples (default {images})")


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` (with its subcommands) to an ``argparse`` subparsers object."""
    a = subparsers.add_parser(
        "analyze", help="analyze a trained run: spectrum, affinity, attention, filter, dynamics, cost, report",
        description="Analyses of trained nonlocal blocks (docs/analysis.md). Each writes PNG plots and a JSON "
                    "of the numbers behind them. Only affinity, attention, filter, dynamics and report read data.")
    sub = a.add_subparsers(dest="analysis", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("spectrum", help="eigenvalues of sym(W_t W_g) per block (seed 000 Figs. 1-4), and their "
                                        "evolution over the epoch checkpoints")
    _common(p)
    p.add_argument("--top", type=int, default=32, help="eigenvalues kept, by magnitude (default 32)")
    p.add_argument("--no-evolution", action="store_true", help="skip the per-epoch evolution")

    p = sub.add_parser("affinity", help="histograms of A, A^2, A^3, A^4 and ||A^k - A|| (seed 002 Fig. 2); "
                                        "reads data")
    _common(p)
    _data(p, 8)
    p.add_argument("--powers", type=int, default=4, help="highest power k (default 4)")
    p.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")

    p = sub.add_parser("attention", help="attention rows of A over the image and feature maps (seed 003 Fig. 3); "
                                         "reads data")
    _common(p)
    _data(p, 2)
    p.add_argument("--query", type=_query, action="extend", nargs="+", metavar="Y,X",
                   help="query positions in image pixels (default: the most salient positions)")
    p.add_argument("--top", type=int, default=2, help="number of salient queries when --query is not given")

    p = sub.add_parser("filter", help="graph filter gain vs eigenvalue of A, with the eigenvalues of real inputs; "
                                      "reads data unless --no-data")
    _common(p)
    _data(p, 4)
    p.add_argument("--points", type=int, default=None,
                   help="λ grid points (default 101, or 41 for blocks wider than 256 channels)")
    p.add_argument("--no-data", action="store_true", help="gain curves only, no λ histogram (reads no data)")

    p = sub.add_parser("dynamics", help="||x_t||/||x_0|| when iterating a trained block on its inputs; reads data")
    _common(p)
    _data(p, 8)
    p.add_argument("--iterations", type=int, default=50, help="iterations (default 50)")

    p = sub.add_parser("cost", help="parameters, FLOPs, peak memory of backbone and blocks (seed 003 Table 6); "
                                    "takes a config YAML too")
    _common(p, "CONFIG_OR_CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="per-sample input shape, e.g. 3,224,224 (default: from the data config)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1: per-image numbers)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")

    p = sub.add_parser("report", help="one self-contained HTML page with all analyses of a run")
    _common(p)
    p.add_argument("--data-root", default=None, help="dataset root (default: data.root of the run's config)")
    p.add_argument("--images", type=int, default=8, help="samples for the data-based sections (default 8)")
    p.add_argument("--iterations", type=int, default=50, help="dynamics iterations (default 50)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements in the cost table")

    for name, sp in sub.choices.items():
        sp.set_defaults(func=_run, analysis=name)
    return a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nonlocalnet")
    sub = parser.add_subparsers(dest="command", required=True)
    add_analyze_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
