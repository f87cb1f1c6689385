"""``nonlocalnet train`` and ``nonlocalnet eval`` subcommands.

Wire into the main parser with ``add_train_parsers(subparsers)``; each subparser sets ``func`` (a callable
taking the parsed namespace and returning an exit status), so ``cli.main`` can run
``sys.exit(args.func(args))``.  ``main(argv)`` here is a standalone entry point for both commands.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_train_parsers", "main", "run_eval", "run_train"]

EXIT_ERROR = 2
EXIT_NONFINITE = 3


def _error(msg: str) -> None:
    print(f"nonlocalnet: error: {msg}", file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    from nonlocalnet.train import (
        CheckpointError,
        ConfigError,
        NonFiniteLossError,
        TrainingError,
        load_config,
        train,
    )

    try:
        cfg = load_config(args.config, args.set or [])
        if args.out:
            cfg.run.out = args.out
        if args.print_config:
            from nonlocalnet.train import dump_config

            print(dump_config(cfg), end="")
            return 0
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        _error(str(e))
        return EXIT_NONFINITE
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        _error(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted; continue with --resume")
        return 130
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from nonlocalnet.train import CheckpointError, ConfigError, TrainingError, evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, args.set or [])
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        _error(str(e))
        return EXIT_ERROR
    print(json.dumps(result))
    return 0


def add_train_parsers(subparsers) -> None:
    """Add ``train`` and ``eval`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train", help="train a model from a YAML config",
        description="Train a model from a YAML config (see docs/configs.md). Writes config.yaml, "
                    "metrics.jsonl and checkpoints to run.out. Launch with torchrun for "
                    "multi-GPU/multi-node.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config key (value parsed as YAML), e.g. --set train.lr=0.05 "
                        "--set 'model.blocks=[]' --set model.blocks.0.block=ns; repeatable")
    p.add_argument("--resume", action="store_true",
                   help="continue from run.out/last.safetensors (exactly: same metrics as an "
                        "uninterrupted run)")
    p.add_argument("--out", default=None, help="shorthand for --set run.out=DIR")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on the test split",
        description="Evaluate a .safetensors checkpoint with the config saved next to it (config.yaml) "
                    "or inside it; prints {\"top1\", \"top5\", \"loss\"} as JSON.")
    e.add_argument("checkpoint", help="a .safetensors checkpoint written by `nonlocalnet train`")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config key, e.g. --set data.root=/data/cifar --set run.device=cpu")
    e.set_defaults(func=run_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nonlocalnet")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
