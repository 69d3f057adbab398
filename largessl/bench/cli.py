"""``largessl bench``: a table of benchmarks, each a module with ``add_arguments(parser)`` and ``run(args)``.

Add a benchmark by adding one line to :data:`BENCHMARKS`; its module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "data": ("largessl.bench.data", "decoded+augmented views/s per CPU core vs a torchvision ImageFolder baseline"),
    "step": ("largessl.bench.step", "SSL step images/s and peak memory vs an anchor-style step and the backbone floor"),
    "e2e": ("largessl.bench.e2e", "shards -> loader -> step: images/s, data-wait fraction, CPU utilisation"),
    "resume": ("largessl.bench.resume", "time to the first batch resuming at 90% of an epoch vs at its start"),
    "knn": ("largessl.bench.knn", "sharded kNN at ImageNet shape (1/20 run, extrapolated): time and peak memory per rank"),
    "syncs": ("largessl.bench.syncs", "host-device syncs per training step for every method (CPU or CUDA)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per benchmark (all modules are imported so each can declare its options)."""
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        # argparse %-formats help strings (not descriptions): a plain '%' in the table must not break --help
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return int(args._bench_run(args) or 0)
