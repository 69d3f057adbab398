"""A deterministic in-memory stand-in for the shard stream, for trainer tests only (never shipped).

Batch content is a pure function of (seed, epoch, batch index, rank), which is exactly the contract the real
stream gives for exact resume, so the trainer's resume logic is exercised without shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from largessl.data.batch import Batch


class SyntheticStream:
    """``batches_per_epoch`` batches of two noisy views of fixed random images per rank and epoch."""

    def __init__(self, num_samples: int, per_rank_batch_size: int, rank: int, world_size: int, seed: int = 0,
                 image_size: int = 16, num_classes: int = 4) -> None:
        self.per_rank_batch_size = per_rank_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = num_samples // (per_rank_batch_size * world_size)
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(num_samples, 3, image_size, image_size, generator=g)
        self.labels = torch.arange(num_samples) % num_classes

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from ``start_batch``."""
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        gbs = self.per_rank_batch_size * self.world_size
        for b in range(start_batch, self.batches_per_epoch):
            lo = b * gbs + self.rank * self.per_rank_batch_size
            idx = order[lo: lo + self.per_rank_batch_size]
            g = torch.Generator().manual_seed(hash((self.seed, epoch, b, self.rank)) % (2**31))
            x = self.images[idx]
            views = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]
            yield Batch(views=views, labels=self.labels[idx], keys=[str(int(i)) for i in idx],
                        stats={"skipped_samples": 0})


def main(argv: list[str]) -> int:
    """``python tests/synthetic_stream.py NUM_SAMPLES key=value ...``: the pretrain CLI's flow on this stream.

    Used by tests that SIGKILL/signal real training processes (one process, or several with torchrun's
    environment variables) before the data pipeline is involved. The probes of ``run_probes`` record what
    this process received and trained on when the environment asks for it.
    """
    import logging
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run_probes

    probes = run_probes.install()

    from largessl.config import load_config
    from largessl.distributed.env import detect_env, init_distributed, setup_logging, shutdown_distributed
    from largessl.train.trainer import Trainer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    num_samples, rest = int(argv[0]), argv[1:]
    # `--allow-change=KEY` as `largessl pretrain` takes it (a rerun that extends train.num_steps)
    allow = [a.split("=", 1)[1] for a in rest if a.startswith("--allow-change=")]
    overrides = [a for a in rest if not a.startswith("--allow-change=")]
    cfg = load_config(None, overrides)
    env = detect_env()
    setup_logging(env, "INFO")
    init_distributed(env, "gloo", cfg.dist.timeout_minutes)
    code, reason = 1, "raised"
    try:
        per_rank = cfg.train.global_batch_size // env.world_size
        stream = SyntheticStream(num_samples, per_rank, env.rank, env.world_size, cfg.train.seed)
        result = Trainer(cfg, env, probes.wrap(stream), num_samples, allow_change=allow).fit()
        code, reason = result.exit_code, result.reason
        logging.getLogger("synthetic").info("exit %d", result.exit_code)
        return result.exit_code
    finally:
        probes.finish(code, reason)
        shutdown_distributed()


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
