"""DeepSpeed on a single rank (one GPU, or here one CPU process): it needs a process group even then."""

from __future__ import annotations

import os

import pytest
import torch
from train_procs import TINY, dump_logs, launch, logged_steps, wait_all

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_zero2_lars_on_one_rank_trains_and_resumes(tmp_path):
    """Without a group DeepSpeed asserts ("Distributed backend is not initialized"); the engine starts a 1-member one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", "train.global_batch_size=8", "dist.strategy=deepspeed",
            "dist.zero_stage=2", "optim.name=lars", "checkpoint.every_steps=2"]
    assert wait_all(launch(1, 32, [*args, "train.num_steps=2"], logs)) == [0], dump_logs(logs)
    assert wait_all(launch(1, 32, [*args, "--allow-change=train.num_steps", "train.num_steps=3"], logs)) == [0], dump_logs(logs)
    recs = logged_steps(run)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    text = dump_logs(logs)
    assert "one-member process group" in text and "resumed from" in text and "ZeRO stage 2" in text
