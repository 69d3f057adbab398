"""The ``largessl`` command line: a table of sub-commands, each implemented in the package it drives.

A sub-command module provides ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its command is used, so one area's heavy imports never slow another. Exceptions become exit codes
here (library code never calls ``sys.exit``): ValueError → bad input, RuntimeError → environment,
FloatingPointError → diverged.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from largessl import __version__, exit_codes
from largessl.dist.env import DistEnv, setup_logging

COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("largessl.train.cli", "pretrain a backbone with an SSL method (resumes automatically)"),
    "demo": ("largessl.demo", "the embedded demo: digits shards → Barlow Twins → kNN/linear vs random init"),
    "config": ("largessl.config_cli", "print the resolved config for a config file and overrides"),
    "shards": ("largessl.data.cli", "write WebDataset shards and a dataset manifest"),
    "eval": ("largessl.eval.cli", "linear and kNN evaluation of a checkpoint or hub model"),
    "hub": ("largessl.hub.cli", "push, list, show, pull, export, yank and page pretrained backbones"),
    "launch": ("largessl.launch.cli", "submit pretraining to SLURM or render Kubernetes jobs"),
    "repro": ("largessl.repro.cli", "reproduce the seed papers' collapse tables at small scale"),
    "bench": ("largessl.bench.cli", "benchmarks: training step, data loading, end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="largessl", description="Distributed self-supervised pretraining.")
    parser.add_argument("--version", action="version", version=f"largessl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops filling a positional list at the first option, so `repro NAME --out D k=v` would
        # leave k=v unrecognised: key=value words after options are config overrides too.
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return exit_codes.BAD_INPUT if argv else exit_codes.OK
    if not logging.getLogger().handlers:
        # Rank 0's view until a command knows its rank; setup_logging() replaces this handler, not adds one.
        setup_logging(DistEnv())
    log = logging.getLogger("largessl")
    try:
        return int(args._run(args) or 0)
    except ValueError as e:
        log.error("%s", e)
        return exit_codes.BAD_INPUT
    except FloatingPointError as e:
        log.error("training diverged: %s", e)
        return exit_codes.DIVERGED
    except RuntimeError as e:
        log.error("%s", e)
        return exit_codes.ENVIRONMENT
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
