"""Resume reads each byte once: on each of 2 gloo ranks, DDP and DeepSpeed ZeRO-2, the trainer's resume reads
only the shared files and that rank's own, each exactly once, counted by a real fsspec filesystem
(tests/counting_fs.py) behind ``checkpoint.dir=counting://...``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dist_harness import run_distributed

SMALL = ["model.arch=repro_convnet", "method.projector=32-32", "train.global_batch_size=8", "train.num_steps=1",
         "train.deterministic=true", "optim.warmup_epochs=1", "log.progress=false", "log.tensorboard=false",
         "eval.online_probe=false", "data.num_workers=0", "train.device=cpu"]
STRATEGIES = {"ddp": [], "deepspeed": ["dist.strategy=deepspeed", "dist.zero_stage=2"]}


def _train_then_resume(rank: int, world: int, root: str, strategy: str) -> tuple[dict[str, int], int]:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    import counting_fs
    from synthetic_stream import SyntheticStream

    from largessl.config import load_config
    from largessl.distributed.env import DistEnv
    from largessl.train.trainer import Trainer

    counting_fs.register()
    cfg = load_config(None, [*SMALL, *STRATEGIES[strategy], f"train.run_dir={root}/run",
                             f"checkpoint.dir=counting://{root}/ckpt"])
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, source="torchrun")
    stream = SyntheticStream(32, 4, rank, world)
    assert Trainer(cfg, env, stream, 32).fit().exit_code == 0
    resumed = Trainer(cfg, env, stream, 32)  # a restarted process: fresh model, optimizer and engine
    counting_fs.reset()
    assert resumed.resume()
    return {p[len(root) + len("/ckpt/step-00000001/"):]: n for p, n in counting_fs.BYTES_READ.items()}, resumed.step


@pytest.mark.parametrize("strategy", [pytest.param(s, marks=[pytest.mark.slow] if s == "deepspeed" else [])
                                      for s in STRATEGIES])  # deepspeed: 35 s, CI only (make test-slow)
def test_resume_reads_each_byte_once(tmp_path: Path, strategy: str) -> None:
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    results = run_distributed(_train_then_resume, 2, str(tmp_path), strategy)
    marker = json.loads((tmp_path / "ckpt" / "step-00000001" / "COMPLETE.json").read_text())
    sizes: dict[str, int] = marker["sizes"]
    rank_files = {0: set(), 1: set()}
    shared = set()
    for rel in sizes:
        if rel.startswith("rank-"):
            rank_files[int(rel[5:10])].add(rel)
        elif "zero_pp_rank_" in rel:
            rank_files[int(rel.split("zero_pp_rank_")[1].split("_")[0])].add(rel)
        elif strategy == "deepspeed" and rel == "model.safetensors":
            continue  # DeepSpeed restores the module from its own module-states file
        else:
            shared.add(rel)
    if strategy == "deepspeed":
        assert any("optim_states" in f for f in rank_files[1]) and any("model_states" in f for f in shared)
    for rank, (read, step) in enumerate(results):
        assert step == 1
        needed = shared | rank_files[rank]
        expected = needed | ({"COMPLETE.json"} if rank == 0 else set())  # rank 0 alone reads the marker
        assert set(read) == expected, (rank, sorted(read), sorted(expected))
        for rel in needed:
            assert read[rel] == sizes[rel], f"rank {rank} read {rel} {read[rel] / sizes[rel]:.2f} times"
        budget = sum(sizes[rel] for rel in needed)
        assert sum(read.values()) <= 1.1 * budget, (rank, sum(read.values()), budget)
