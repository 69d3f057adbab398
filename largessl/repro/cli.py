"""``largessl repro NAME [--seeds K] [--minutes M] [--steps N] [--backbone B] [--out DIR] [key=value ...]`` and
``largessl repro --list``.

Runs the variants of one seed-paper table with the real trainer on CPU (digits shards, no download), each on
K seeds, prints the paper's numbers beside ours (mean ± std) with a verdict per row, and writes
``DIR/NAME/results.json`` and ``DIR/NAME/NAME.png``. Rerunning with the same ``--out`` reuses finished runs
and continues ones the time budget stopped.
"""

from __future__ import annotations

import argparse
import logging

from largessl.repro.tables import TABLES

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl repro``."""
    p.add_argument("name", nargs="?", help=f"table to reproduce: {', '.join(TABLES)}, or 'all'")
    p.add_argument("--list", action="store_true", help="name the available tables and exit")
    p.add_argument("--seeds", type=int, default=3,
                   help="run every variant with train.seed 0..K-1 and print mean ± std (default 3); effect "
                        "claims need at least 2 seeds (an interval), else they print 'unresolved'")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget of the whole command in minutes, split over variants and seeds "
                        "(default: the table's per-seed budget x --seeds, see --list)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the table's)")
    p.add_argument("--data", default="photodigits", choices=["photodigits", "digits"],
                   help="embedded dataset, at the backbone's image size (default photodigits: digits over "
                        "photographs, where a random encoder is far from a trained one; digits: sklearn's, near "
                        "the ceiling from random init)")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "convnet"],
                   help="resnet18 (default): torchvision's ResNet-18 on 32 px images, 200 steps per run, about 1.7 min "
                        "a run on 2 CPU cores; convnet: a 3-conv network on 16 px images, each table's own length, "
                        "about 5x faster, where collapse shows but the accuracy claims do not (it learns less than "
                        "its random init scores)")
    p.add_argument("--out", default="runs/repro", help="output directory (default: runs/repro)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="config overrides for every variant, after the table's own (e.g. train.seed=1)")


def run(args: argparse.Namespace) -> int:
    """List the tables, or run one (or all) and print the comparison."""
    from largessl.repro.report import format_list, format_table

    if args.list:
        print(format_list(TABLES))
        return 0
    if not args.name:
        raise ValueError(f"name a table to reproduce ({', '.join(TABLES)}, or all); largessl repro --list "
                         "describes them")
    names = list(TABLES) if args.name == "all" else [args.name]
    from largessl.repro.runner import Interrupted, run_table
    from largessl.repro.tables import get_table
    from largessl.run import exit_codes

    tables = [get_table(n) for n in names]  # unknown names fail before any training
    for t in tables:
        try:
            result = run_table(t, args.out, minutes=args.minutes, num_steps=args.steps, overrides=args.overrides,
                               seeds=args.seeds, dataset=args.data, backbone=args.backbone)
        except Interrupted as e:
            log.error("%s", e)
            return exit_codes.REQUEUE
        print(format_table(t, result))
        print(f"results: {result['json']}\nplot:    {result['png']}\n", flush=True)
    return 0
