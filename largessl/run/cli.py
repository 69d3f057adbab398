"""``largessl status RUN_DIR... | --root DIR [--json]``: where each run is (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import sys

from largessl.run.status import find_runs, format_table, run_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl status``."""
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories (train.run_dir)")
    parser.add_argument("--root", action="append", default=[], metavar="DIR",
                        help="also every run directory below DIR (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON list for scripts instead of the table")


def run(args: argparse.Namespace) -> int:
    """Print the status of the named runs and of every run below ``--root``."""
    dirs = list(args.run_dirs)
    for root in args.root:
        found = find_runs(root)
        if not found:
            raise ValueError(f"no run directories below {root}")
        dirs += [str(p) for p in found]
    if not dirs:
        raise ValueError("name at least one RUN_DIR or --root DIR")
    rows = [run_status(d) for d in dirs]
    sys.stdout.write((json.dumps(rows, indent=1) if args.json else format_table(rows)) + "\n")
    return 0
