"""The ``largessl`` command line: a table of sub-commands, each implemented in the package it drives.

A sub-command module provides ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its command is used, so one area's heavy imports never slow another. Exceptions become exit codes
here (library code never calls ``sys.exit``), see :func:`largessl.run.exit_codes.exit_code_for`: ValueError → 2 (bad input),
OSError and storage-client errors (fsspec, botocore, s3fs, gcsfs) → 3, RuntimeError → 3 (environment),
FloatingPointError → 4 (diverged), anything else → 1 (a bug). The error is printed as one line; the
traceback goes to the log above it (for a bug) or at DEBUG level.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from largessl import __version__
from largessl.distributed.env import DistEnv, setup_logging
from largessl.run import exit_codes
from largessl.run.exit_codes import exit_code_for, is_storage_error

__all__ = ["COMMANDS", "build_parser", "end_process", "exit_code_for", "is_storage_error", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("largessl.train.cli", "pretrain a backbone with an SSL method (resumes automatically)"),
    "demo": ("largessl.demo", "the embedded demo: digits shards → Barlow Twins → kNN/linear vs random init"),
    "config": ("largessl.config_cli", "print the resolved config for a config file and overrides"),
    "shards": ("largessl.data.cli", "write WebDataset shards and a dataset manifest"),
    "eval": ("largessl.eval.cli", "linear and kNN evaluation of a checkpoint or hub model"),
    "hub": ("largessl.hub.cli", "push, list, show, pull, export, yank and page pretrained backbones"),
    "launch": ("largessl.launch.cli", "submit pretraining to SLURM or render Kubernetes jobs"),
    "status": ("largessl.run.cli", "where each run is: state, step, loss, images/s, ETA, checkpoint, collapse"),
    "sweep": ("largessl.launch.sweep_cli", "run a grid of config overrides (x seeds) as one job array; its status table"),
    "repro": ("largessl.repro.cli", "reproduce the seed papers' collapse tables at small scale"),
    "bench": ("largessl.bench.cli", "benchmarks: training step, data loading, end to end"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="largessl", description="Distributed self-supervised pretraining.")
    parser.add_argument("--version", action="version", version=f"largessl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        # argparse %-formats help strings (not descriptions): a plain '%' in the table must not break --help
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script (``argv`` None: the process's own arguments; then a failing
    distributed run ends the process at once instead of returning, see below)."""
    hard_exit = argv is None
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
    except BaseException as e:  # every exception becomes an exit code here, and only here
        if isinstance(e, SystemExit):
            raise
        code, message = exit_code_for(e)
        if code == exit_codes.UNEXPECTED:
            log.error("unexpected error; traceback:", exc_info=e)
        else:
            log.debug("traceback of the error below:", exc_info=e)
        log.error("%s", message)
        if hard_exit:
            # The process ends now with the code the scheduler acts on, whatever else is alive: interpreter exit
            # would join DataLoader workers (which ignore SIGTERM, see data/stream.py) that may be stuck on the
            # storage that failed, and with a dead peer tearing the process group down can block forever. The
            # workers die with this process (PR_SET_PDEATHSIG); finally blocks and context managers already ran.
            end_process(code)
        return code


def end_process(code: int) -> None:
    """Flush logs and standard streams, then ``os._exit(code)`` (no interpreter teardown that could hang)."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # a broken log stream must not keep the process alive
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
