"""The ``nonlocalnet`` command: ``train``, ``eval``, ``analyze``, ``bench``, ``blocks``."""

from __future__ import annotations

import argparse
import sys


def _blocks(args: argparse.Namespace) -> int:
    from nonlocalnet.presets import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name:6} {preset.reference}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from nonlocalnet.bench import run

    run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nonlocalnet import __version__

    parser = argparse.ArgumentParser(
        prog="nonlocalnet",
        description="Nonlocal neural networks: train, evaluate, analyze and benchmark nonlocal blocks.",
    )
    parser.add_argument("--version", action="version", version=f"nonlocalnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("blocks", help="list the nonlocal blocks and the paper each follows")
    p.set_defaults(func=_blocks)

    try:
        from nonlocalnet.cli_train import add_train_parsers
    except ImportError:  # pragma: no cover - training extras missing
        add_train_parsers = None
    if add_train_parsers is not None:
        add_train_parsers(sub)

    try:
        from nonlocalnet.analysis.cli import add_analyze_parser
    except ImportError:
        add_analyze_parser = None
    if add_analyze_parser is not None:
        add_analyze_parser(sub)

    from nonlocalnet.train.demo import add_demo_parser

    add_demo_parser(sub)

    from nonlocalnet.bench import build_parser as bench_parser

    p = sub.add_parser("bench", help="time and peak memory of every backend against dense, side by side")
    bench_parser(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
