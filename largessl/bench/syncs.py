"""``largessl bench syncs``: host-device syncs per training step for every method (CPU or CUDA).

Each method runs the trainer's :meth:`~largessl.train.trainer.Trainer.hot_step` (forward, backward, update and
the default online probe) under :class:`largessl.nn.host_sync.HostSyncCounter`; with ``--data`` the batches
come from those shards through the configured data path (``data.decode=gpu`` counts its main-process stage
too), else from pinned synthetic batches. Log and save steps are not counted (they sync by design). The counts
do not depend on speed: a CPU run gives the same figures a GPU run should, bar pageable copies, which only a
CUDA run can see.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from largessl.config import load_config
from largessl.data.batch import Batch
from largessl.distributed.env import DistEnv

DEFAULT_METHODS = ("barlow_twins", "vicreg", "simsiam", "multiview", "decorrelation")


class _SyntheticBatches:
    """A stream of fixed random batches (two or more views, labels) for the trainer to plan a run on."""

    def __init__(self, batch_size: int, num_views: int, image_size: int, num_classes: int = 10) -> None:
        self.batches_per_epoch = 1000
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.batch = Batch(views=[torch.randn(batch_size, 3, image_size, image_size, generator=g)
                                  for _ in range(num_views)],
                           labels=torch.randint(0, num_classes, (batch_size,), generator=g),
                           keys=[str(i) for i in range(batch_size)], stats={})
        if torch.cuda.is_available():
            self.batch = self.batch.pin_memory()  # as the DataLoader hands batches over

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The same batch, ``batches_per_epoch`` times."""
        for _ in range(start_batch, self.batches_per_epoch):
            yield self.batch


def count_method(method: str, overrides: list[str], batch_size: int, steps: int, data: str | None) -> dict[str, Any]:
    """Syncs per step of ``method`` (one warm-up step first)."""
    from largessl.bench.step import count_step_host_syncs
    from largessl.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="largessl-syncs-") as run_dir:
        # multiview's default M is 4 views; count it on the two views the data path makes by default
        views = ["method.num_views=2"] if method == "multiview" else []
        cfg = load_config(None, [f"method.name={method}", *views, *overrides, f"train.global_batch_size={batch_size}",
                                 "log.progress=false", "log.tensorboard=false", f"train.run_dir={run_dir}"])
        if data:
            from largessl.data.manifest import read_manifest
            from largessl.data.stream import build_train_stream

            stream: Any = build_train_stream(cfg.data, read_manifest(data), batch_size, 0, 1, seed=cfg.train.seed)
            samples = stream.batches_per_epoch * batch_size
        else:
            stream = _SyntheticBatches(batch_size, cfg.data.num_views, cfg.data.image_size)
            samples = stream.batches_per_epoch * batch_size
        trainer = Trainer(cfg, DistEnv(), stream, samples)
        per_step = count_step_host_syncs(trainer, iter(stream.iterate(0)), steps, warmup=1, count_data=bool(data))
    total = [sum(s.values()) for s in per_step]
    return {"method": method, "device": str(trainer.device), "decode": cfg.data.decode if data else "synthetic",
            "online_probe": trainer.probe is not None, "per_step": per_step, "max_per_step": max(total)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``largessl bench syncs``."""
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.device=cuda data.decode=gpu")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="counted steps per method (after one warm-up)")
    parser.add_argument("--data", default=None, help="train manifest to take the batches from (else synthetic)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")


def run(args: argparse.Namespace) -> int:
    """Count and print; exit 0 (the counts are figures, not a verdict)."""
    rows = [count_method(m, list(args.overrides), args.batch_size, args.steps, args.data)
            for m in args.methods.split(",") if m]
    print("largessl bench syncs: host syncs per training step (outside log/save steps)")
    for r in rows:
        print(f"{r['method']:<14} {r['device']:<7} decode={r['decode']:<9} max/step={r['max_per_step']:>3}  "
              f"{r['per_step']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "syncs", "rows": rows}, f, indent=2)
    return 0
