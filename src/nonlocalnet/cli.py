"""The ``nonlocalnet`` command, the only place that knows argparse: every subcommand is defined here and
calls the library. ``python -m nonlocalnet`` (also under ``torchrun``) runs the same :func:`main`.

A user's mistake ends with one line on stderr, ``nonlocalnet: error: …``, and exit status 2 (3 when the
loss became non-finite), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nonlocalnet import __version__
from nonlocalnet.analysis import (
    AnalysisError,
    run_affinity,
    run_attention,
    run_cost,
    run_dynamics,
    run_filter,
    run_spectrum,
    write_report,
)
from nonlocalnet.analysis.attention import parse_query
from nonlocalnet.analysis.output import default_out
from nonlocalnet.apps.demo import DEFAULT_RUNS, run_demo
from nonlocalnet.apps.summary import summarize
from nonlocalnet.apps.sweep import run_sweep
from nonlocalnet.bench import bench_device, check_dense_cap, run_naive, training_throughput
from nonlocalnet.bench import run as run_bench
from nonlocalnet.bench.approx import run_approx
from nonlocalnet.bench.naive import CASES as NAIVE_CASES
from nonlocalnet.bench.peers import PEERS, PeerMissingError, run_peers
from nonlocalnet.bench.spectral import run_spectral, run_spectral_vs_snl
from nonlocalnet.kernels import BACKENDS
from nonlocalnet.presets import PRESETS
from nonlocalnet.runs import (
    CheckpointError,
    ConfigError,
    DatasetError,
    RunDirError,
    Terminated,
    copy_config,
    dump_config,
    format_configs,
    load_config,
    load_config_only,
    load_run,
)
from nonlocalnet.train import NonFiniteLossError, TrainingError, evaluate_checkpoint, train

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
EXIT_NONFINITE = 3
ANALYSES = ("spectrum", "affinity", "attention", "filter", "dynamics", "cost", "report")


class UserError(Exception):
    """A mistake in the command line; reported as one line."""


# ------------------------------------------------------------------------------------------- commands


def cmd_blocks(args: argparse.Namespace) -> int:
    for name, preset in PRESETS.items():
        print(f"{name:6} {preset.reference}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if args.copy:
        print(copy_config(*args.copy))
        return 0
    print(format_configs(), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.run.out = args.out
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.allow_model_change and not args.resume:
        raise UserError("--allow-model-change is for --resume (a fresh run builds the configured model anyway)")
    summary = train(cfg, resume=args.resume, allow_model_change=args.allow_model_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.set)))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.analysis == "report":
        out = Path(args.out) if args.out else default_out(path if path.is_dir() else path.parent, "report")
        print(write_report(path, out, args.data_root, overrides=args.set, images=args.images,
                           iterations=args.iterations, device=args.device, memory=not args.no_memory))
        return 0
    if args.analysis == "cost" and path.suffix in (".yaml", ".yml"):
        loaded = load_config_only(path, args.set, device=args.device)
    else:
        loaded = load_run(path, args.set, device=args.device)
    out = Path(args.out) if args.out else default_out(loaded, args.analysis)
    data_opts = {}
    if args.analysis in ("affinity", "attention", "filter", "dynamics"):
        data_opts = dict(data_root=args.data_root, split=args.split, images=args.images)
    if args.analysis == "spectrum":
        data = run_spectrum(loaded, out, top=args.top, evolution=not args.no_evolution)
    elif args.analysis == "affinity":
        data = run_affinity(loaded, out, max_power=args.powers, bins=args.bins, **data_opts)
    elif args.analysis == "attention":
        data = run_attention(loaded, out, queries=args.query or None, top=args.top, **data_opts)
    elif args.analysis == "filter":
        data = run_filter(loaded, out, points=args.points, use_data=not args.no_data, **data_opts)
    elif args.analysis == "dynamics":
        data = run_dynamics(loaded, out, iterations=args.iterations, **data_opts)
    else:
        data = run_cost(loaded, out, input_shape=args.input_shape, batch=args.batch, memory=not args.no_memory,
                        device=args.device)
        print((out / "cost.md").read_text(), end="")
    for f in data.get("figures", []):
        print(f)
    print(out / f"{args.analysis}.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, args.configs, args.runs, args.set, not args.no_analysis, seeds=args.seeds)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    seeds = args.seed_list or list(range(args.seeds))
    dirs = run_sweep(args.configs, seeds, args.out, args.set)
    for d in dirs:
        print(d)
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    summarize(args.runs, args.out, reach=args.reach)
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(Path(args.out) / "summary.json")
    print(Path(args.out) / "curves.png")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.throughput:
        training_throughput(args.blocks or ["snl", "nl", "cc"], batch=args.batch or 128,
                            size=(args.sizes or [32])[0], steps=args.repeats or 3, threads=(args.threads or [2])[0],
                            json_path=args.json)
        return 0
    if args.baseline == "naive":
        for case in args.cases or []:
            if case not in NAIVE_CASES:
                raise SystemExit(f"bench: error: --cases: unknown case {case!r}; valid: {', '.join(NAIVE_CASES)}")
        run_naive(cases=args.cases, blocks=None if args.all_blocks else args.blocks,
                  sizes=args.sizes or [32, 64], batch=args.batch or 2, channels=args.channels or 64,
                  modes=args.modes or ["fwd", "fwd+bwd"], threads=args.threads or [1, 2],
                  repeats=args.repeats or 5, dense_cap_gib=args.dense_cap_gib, channels_last=args.channels_last,
                  json_path=args.json, processes=args.processes)
        return 0
    if args.baseline == "peers":
        run_peers(peers=args.peers, sizes=args.sizes or [32, 64], video=args.video or [(8, 16, 16)],
                  batch=args.batch or 2, channels=args.channels or 64,
                  modes=args.modes or ["fwd", "fwd+bwd"], threads=args.threads or [1, 2], repeats=args.repeats or 7,
                  memory=not args.no_memory, json_path=args.json, processes=args.processes, compiled=args.compile)
        return 0
    if args.approx:
        run_approx(sides=args.sizes or (16, 32, 64, 128),
                   video=args.video if args.sizes else (args.video or [(4, 32, 32)]),
                   features=args.features or (16, 32, 64, 128, 256), logit_scales=args.logit_scales or (1.0, 3.0),
                   channels=args.channels or 64, batch=args.batch or 1, repeats=args.repeats or 3,
                   threads=(args.threads or [1])[0], json_path=args.json)
        return 0
    if args.vs_snl and not args.spectral:
        raise SystemExit("bench: error: --vs-snl goes with --spectral")
    if args.spectral and args.vs_snl:
        run_spectral_vs_snl(channels=args.vs_snl, sides=args.sizes or (7, 10, 14, 32, 64), batch=args.batch or 2,
                            repeats=args.repeats or 3, threads=(args.threads or [None])[0], json_path=args.json)
        return 0
    if args.spectral:
        run_spectral(sizes=args.sizes or (32, 64, 96), batch=args.batch or 1, channels=args.channels or 64,
                     repeats=args.repeats or 5, eigh_max=args.eigh_max, json_path=args.json)
        return 0
    run_bench(quick=args.quick, blocks=["all"] if args.all_blocks else args.blocks, backends=args.backends,
              sizes=args.sizes, video=args.video, batch=args.batch, channels=args.channels, modes=args.modes,
              dtypes=args.dtype, repeats=args.repeats, device=args.device, dense_cap_gib=args.dense_cap_gib,
              floor=args.floor, compile_floor=args.compile_floor, json_path=args.json, plot=args.plot)
    return 0


# --------------------------------------------------------------------------------------- argument types


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 3,32,32, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive dimensions, got {text!r}")
    return dims


def _clip(text: str) -> tuple[int, int, int]:
    dims = _shape(text)
    if len(dims) != 3:
        raise argparse.ArgumentTypeError(f"expected a clip size TxHxW (three positive ints), got {text!r}")
    return dims


def _query(text: str) -> tuple[int, int]:
    try:
        return parse_query(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def _gib(text: str) -> float:
    try:
        return check_dense_cap(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}") from None


def _device(text: str) -> str:
    try:
        bench_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _block_name(text: str) -> str:
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown block {text!r}; valid: {', '.join(PRESETS)}")
    return text


# -------------------------------------------------------------------------------------------- parsers


def _set_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a key of {what} (value parsed as YAML), e.g. --set train.lr=0.05 "
                        "--set model.blocks.0.block=ns; repeatable")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a model from a YAML config (docs/configs.md). Writes config.yaml, "
                                   "metrics.jsonl and checkpoints to run.out. For several GPUs or nodes: "
                                   "torchrun --nproc_per_node N -m nonlocalnet train CONFIG.yaml")
    p.add_argument("config", help="a YAML config file, or the name of a shipped config (`nonlocalnet configs` lists "
                                   "them), e.g. tao2018/preresnet20_cifar10, with or without .yaml; a path that "
                                   "exists wins")
    _set_option(p, "the config")
    p.add_argument("--resume", action="store_true",
                   help="continue from run.out/last.safetensors (exactly: same metrics as an uninterrupted run)")
    p.add_argument("--allow-model-change", action="store_true",
                   help="with --resume: load the checkpoint into a model configured differently from the one it "
                        "saved (same tensor names, shapes and dtypes); without it such a resume is refused")
    p.add_argument("--out", default=None, help="shorthand for --set run.out=DIR")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split",
                       description="Evaluate a .safetensors checkpoint with the config saved next to it "
                                   "(config.yaml) or inside it; prints {\"top1\", \"top5\", \"loss\"} as JSON "
                                   "(top5 only with more than 5 classes).")
    e.add_argument("checkpoint", help="a .safetensors checkpoint written by `nonlocalnet train`, or its run dir "
                                      "(last.safetensors, else best, else the latest epoch file)")
    _set_option(e, "the run's config (e.g. --set data.root=/data/cifar --set run.device=cpu)")
    e.set_defaults(func=cmd_eval)


def _add_analyze(sub) -> None:
    a = sub.add_parser(
        "analyze", help="analyze a trained run: spectrum, affinity, attention, filter, dynamics, cost, report",
        description="Analyses of trained nonlocal blocks (docs/analysis.md). Each writes PNG plots and a JSON of the "
                    "numbers behind them. Only affinity, attention, filter, dynamics and report read data.")
    asub = a.add_subparsers(dest="analysis", metavar="SUBCOMMAND", required=True)

    def common(p: argparse.ArgumentParser, what: str = "CHECKPOINT_OR_RUN_DIR") -> None:
        p.add_argument("path", metavar=what,
                       help="a run dir (uses last.safetensors, else best, else the latest epoch file) or a "
                            ".safetensors checkpoint written by `nonlocalnet train`")
        p.add_argument("--out", default=None, help="output directory (default: <run dir>/analysis/<subcommand>)")
        _set_option(p, "the run's config (e.g. --set data.root=/data/cifar)")
        p.add_argument("--device", type=_device, default="cpu",
                       help="torch device for the forward passes (default cpu)")

    def data(p: argparse.ArgumentParser, images: int) -> None:
        p.add_argument("--data-root", default=None,
                       help="dataset root (default: data.root of the run's config; the 'demo' dataset needs none)")
        p.add_argument("--split", choices=("test", "train"), default="test", help="which split to take samples from")
        p.add_argument("--images", type=_positive_int, default=images, help=f"number of samples (default {images})")

    p = asub.add_parser("spectrum", help="eigenvalues of sym(W_t W_g) per block (Tao et al. 2018, Figs. 1-4), and "
                                         "their evolution over the epoch checkpoints")
    common(p)
    p.add_argument("--top", type=_positive_int, default=32, help="eigenvalues kept, by magnitude (default 32)")
    p.add_argument("--no-evolution", action="store_true", help="skip the per-epoch evolution")

    p = asub.add_parser("affinity", help="histograms of A, A^2, A^3, A^4 and ||A^k - A|| (the stable hypothesis "
                                         "of the spectral nonlocal block, ICLR 2020 submission, Fig. 2); reads data")
    common(p)
    data(p, 8)
    p.add_argument("--powers", type=_positive_int, default=4, help="highest power k (default 4)")
    p.add_argument("--bins", type=_positive_int, default=50, help="histogram bins (default 50)")

    p = asub.add_parser("attention", help="attention rows of A over the image and feature maps (Zhu et al., "
                                          "ICCV 2021, Fig. 3); reads data")
    common(p)
    data(p, 2)
    p.add_argument("--query", type=_query, action="extend", nargs="+", metavar="Y,X",
                   help="query positions in image pixels (default: the most salient positions)")
    p.add_argument("--top", type=_positive_int, default=2, help="number of salient queries when --query is not given")

    p = asub.add_parser("filter", help="graph filter gain vs eigenvalue of A, with the eigenvalues of real inputs; "
                                       "reads data unless --no-data")
    common(p)
    data(p, 4)
    p.add_argument("--points", type=_positive_int, default=None,
                   help="λ grid points (default 101, or 41 for blocks wider than 256 channels)")
    p.add_argument("--no-data", action="store_true", help="gain curves only, no λ histogram (reads no data)")

    p = asub.add_parser("dynamics", help="||x_t||/||x_0|| when iterating a trained block on its inputs; reads data")
    common(p)
    data(p, 8)
    p.add_argument("--iterations", type=_positive_int, default=50, help="iterations (default 50)")

    p = asub.add_parser("cost", help="parameters, FLOPs, peak memory of backbone and blocks (Zhu et al., ICCV 2021, "
                                     "Table 6); takes a config YAML too")
    common(p, "CONFIG_OR_CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="per-sample input shape, e.g. 3,224,224 (default: from the data config)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1: per-image numbers)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")

    p = asub.add_parser("report", help="one self-contained HTML page with all analyses of a run")
    common(p)
    p.add_argument("--data-root", default=None, help="dataset root (default: data.root of the run's config)")
    p.add_argument("--images", type=_positive_int, default=8, help="samples for the data-based sections (default 8)")
    p.add_argument("--iterations", type=_positive_int, default=50, help="dynamics iterations (default 50)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements in the cost table")

    for name, sp in asub.choices.items():
        sp.set_defaults(func=cmd_analyze, analysis=name)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train baseline / +NL / +SNL on the bundled task and write a report")
    p.add_argument("--out", default="runs", help="root of the run directories (default: runs)")
    p.add_argument("--configs", default=None,
                   help="directory with baseline.yaml, nl.yaml, snl.yaml (default: the shipped demo configs, "
                        "`nonlocalnet configs`)")
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="which configs to train")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train every model with each of these seeds (runs/demo-NAME-seedS) and report mean ± std; "
                        "default: one run per model with the config's train.seed (runs/demo-NAME)")
    _set_option(p, "every run's config")
    p.add_argument("--no-analysis", action="store_true", help="skip the per-run analysis reports")
    p.set_defaults(func=cmd_demo)


def _add_configs(sub) -> None:
    p = sub.add_parser("configs", help="list the shipped configs by paper, or copy one out to edit",
                       description="The configs shipped with the package, one folder per paper, with the table row "
                                   "and the paper's number where a config reproduces one (docs/configs.md). "
                                   "`nonlocalnet train NAME` trains one by name.")
    p.add_argument("--copy", nargs=2, metavar=("NAME", "DIR"), default=None,
                   help="write the shipped config NAME to DIR/<name>.yaml (its base: chain merged in); never "
                        "overwrites")
    p.set_defaults(func=cmd_configs)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train several configs over several seeds, one after another (resumable)",
                       description="Train every CONFIG with every seed, one run after another, into "
                                   "OUT/<config name>/seed<k>. Finished runs are skipped and interrupted ones "
                                   "resumed, so the same command continues a killed sweep.")
    p.add_argument("configs", nargs="+", help="YAML config files or shipped configs' names (`nonlocalnet configs`)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds instead of --seeds")
    p.add_argument("--out", default="runs/sweep", help="root of the run directories (default runs/sweep)")
    _set_option(p, "every config")
    p.set_defaults(func=cmd_sweep)

    s = sub.add_parser("summarize", help="table (markdown, JSON) and curves over runs, mean ± std over seeds",
                       description="Group runs by config (seeds together) and write summary.md, summary.json and "
                                   "curves.png: final/best top-1, epochs to reach an accuracy, time per epoch, "
                                   "parameters, FLOPs, and the paper's number where the config has one.")
    s.add_argument("runs", nargs="+", help="run directories (e.g. runs/sweep/*/seed*)")
    s.add_argument("--out", default="runs/summary", help="output directory (default runs/summary)")
    s.add_argument("--reach", type=float, default=90.0, help="accuracy (%%) whose first epoch is reported (90)")
    s.set_defaults(func=cmd_summarize)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time and peak memory of every backend against dense, side by side",
                       description="Benchmarks: every preset and backend against the dense path, side by side in "
                                   "one run; prints ratios and measured peak memory (docs/benchmarks.md).")
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in well under 2 minutes on CPU")
    p.add_argument("--blocks", nargs="+", type=_block_name, default=None,
                   help=f"presets (default: snl nl; any of {', '.join(PRESETS)})")
    p.add_argument("--all-blocks", action="store_true", help="every preset")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="backends (default: all a preset supports)")
    p.add_argument("--sizes", nargs="+", type=_positive_int, default=None, help="square sides H=W (N = side²)")
    p.add_argument("--video", nargs="+", type=_clip, default=[], help="clip sizes TxHxW, e.g. 4x28x28 (3-D blocks)")
    p.add_argument("--batch", type=_positive_int, default=None)
    p.add_argument("--channels", type=_positive_int, default=None)
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=None)
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"])
    p.add_argument("--repeats", type=_positive_int, default=None)
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dense-cap-gib", type=_gib, default=6.0, help="skip dense runs needing more than this")
    p.add_argument("--floor", action="store_true",
                   help="also measure each block's forward time against its own 1x1 projections (largest size)")
    p.add_argument("--compile-floor", action="store_true",
                   help="with --floor: also the floor of the torch.compile'd block (inductor)")
    p.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")
    p.add_argument("--plot", default=None, help="write a log-log plot of time vs N (PNG) to this file")
    p.add_argument("--baseline", choices=["dense", "naive", "peers"], default="dense",
                   help="dense (default): every backend against the block's own dense path; naive: every preset "
                        "against a literal NCHW implementation of the same math as public code computes it "
                        "(bench/naive.py), same weights, interleaved; prints naive time / block time; peers: the "
                        "public modules themselves (timm, mmcv-lite; bench/peers.py), weights mapped through "
                        "compat, checked equal in float64, then timed; prints peer time / block time")
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=None,
                   help="with --baseline peers: which (default: every one whose package is installed)")
    p.add_argument("--no-memory", action="store_true", help="with --baseline peers: skip the peak-memory columns")
    p.add_argument("--cases", nargs="+", default=None,
                   help=f"with --baseline naive: cases to run (default all: {', '.join(NAIVE_CASES)}); --blocks "
                        "selects every case of a preset")
    p.add_argument("--threads", nargs="+", type=_positive_int, default=None,
                   help="with --baseline naive/peers: intra-op thread counts, each set explicitly (default 1 2)")
    p.add_argument("--compile", action="store_true",
                   help="with --baseline peers: also time both modules under torch.compile (inductor) in the same "
                        "rounds (columns 'peer c', 'ours c'); the eager columns are what a user gets by default")
    p.add_argument("--processes", type=_positive_int, default=1,
                   help="with --baseline naive/peers: measure the table in this many fresh processes, one after "
                        "another, "
                        "and print the median ratio and its range per cell (a process's timings can differ from "
                        "another's by 2x on a VM; docs/benchmarks.md)")
    p.add_argument("--throughput", action="store_true",
                   help="training images/s of PreResNet-56 with one block (--blocks, default snl nl cc) after stage 1, "
                        "auto vs the dense backend vs the naive formulation, interleaved SGD steps (--batch, default "
                        "128; --sizes: image side, default 32; --repeats: steps, default 3; --threads: first value)")
    p.add_argument("--channels-last", action="store_true",
                   help="with --baseline naive: give both a channels_last input")
    p.add_argument("--spectral", action="store_true",
                   help="instead: the spectral filters' exact r x r path vs Chebyshev orders 2/4/8, their Chebyshev "
                        "approximation and dense eigh (B=1, C=64, sides 32 64 96 unless given; docs/spectral.md)")
    p.add_argument("--vs-snl", nargs="+", type=_positive_int, default=None, metavar="C",
                   help="with --spectral: instead, Cayley/heat/wavelet forward+backward on their default path "
                        "against SNL at each of these channel counts C (rank r = C) and --sizes (default 7 10 14 32 "
                        "64), B=2 unless --batch; --threads: first value; prints the exact form each takes")
    p.add_argument("--eigh-max", type=_positive_int, default=96 * 96,
                   help="--spectral: largest N for the dense eigh rows")
    p.add_argument("--approx", action="store_true",
                   help="instead: error, time and peak memory of approx='performer' / 'nystrom' against the exact "
                        "softmax (sdpa) on an nl block, trained-like inputs (sides 16 32 64 128 and clip 4x32x32 "
                        "unless given, C=64, B=1, 1 thread unless --threads; docs/approximations.md)")
    p.add_argument("--features", nargs="+", type=_positive_int, default=None, metavar="M",
                   help="with --approx: the numbers m of random features / landmarks (default 16 32 64 128 256)")
    p.add_argument("--logit-scales", nargs="+", type=_positive_float, default=None, metavar="SIGMA",
                   help="with --approx: the standard deviations of the logits to measure at (default 1 3)")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nonlocalnet",
        description="Nonlocal neural networks: train, evaluate, analyze and benchmark nonlocal blocks.")
    parser.add_argument("--version", action="version", version=f"nonlocalnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("blocks", help="list the nonlocal blocks and the paper each follows")
    p.set_defaults(func=cmd_blocks)
    _add_configs(sub)
    _add_train(sub)
    _add_analyze(sub)
    _add_demo(sub)
    _add_sweep(sub)
    _add_bench(sub)
    return parser


def _error(msg: str) -> None:
    print(f"nonlocalnet: error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as e:
        _error(str(e))
        return EXIT_NONFINITE
    except (ConfigError, CheckpointError, DatasetError, TrainingError, AnalysisError, RunDirError,
            FileNotFoundError, UserError, PeerMissingError) as e:
        _error(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted; a training run continues with --resume")
        return 130
    except Terminated as e:
        _error(f"{e}; a training run continues with --resume")
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
