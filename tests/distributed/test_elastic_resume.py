"""Elastic resume through the real trainer on real shards: 2 → 4 → 2 gloo ranks, then 2 loader workers → 1.

Each leg stops itself at a fixed step through the trainer's stop path (save, exit 75); the next leg
resumes it on another world size or worker count. Within the epoch of the changes every sample is seen
exactly once; steps, lr and optimizer state continue; the next epoch runs on the last split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elastic_train import optimizer_digest
from train_procs import dump_logs, logged_steps, wait_all

from largessl.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 128


def _launch(world: int, args: list[str], log_dir: Path, script: str = "elastic_train.py") -> list[subprocess.Popen]:
    """``world`` ranks of ``tests/<script> args...`` with torchrun's environment (also for one rank)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        out = open(log_dir / f"w{world}-rank{rank}-{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / script), *args], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    batches, resumes = [], []
    for f in sorted((run / "record").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            (resumes if "resumed" in row else batches).append(row)
    return batches, resumes


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from largessl.data.digits import write_digits_shards

    train, _ = write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)
    return train


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_resume_2_to_4_to_2_ranks_then_2_workers_to_1_sees_each_sample_once(digits: str, tmp_path: Path) -> None:
    from largessl.data.manifest import read_manifest
    from largessl.run.checkpoint import load_training_checkpoint

    manifest = read_manifest(digits)
    bpe = manifest.num_samples // GLOBAL_BATCH  # 11 for the 1,438 training digits
    num_steps = bpe + 2  # the last leg crosses into epoch 1 on its own split
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    common = ["model.arch=repro_convnet", "method.projector=32-32", "data.augment=small",
              "data.image_size=16", f"data.train_manifest={digits}", "data.shuffle_buffer=40",
              f"train.global_batch_size={GLOBAL_BATCH}", f"train.num_steps={num_steps}", "train.log_every=1",
              "train.collapse_every=1000", "train.deterministic=true", "optim.warmup_epochs=0.2",
              "log.progress=false", "log.tensorboard=false", "eval.online_probe=false",
              "checkpoint.every_steps=1000", "checkpoint.keep=10", f"train.run_dir={run}"]
    legs = [(2, 2, 3), (4, 2, 6), (2, 2, 9), (2, 1, 0)]  # (ranks, workers, stop at step; 0 = to the end)
    for world, workers, stop_at in legs:
        codes = wait_all(_launch(world, [str(stop_at), *common, f"data.num_workers={workers}"], logs), timeout=400)
        assert codes == [75 if stop_at else 0] * world, dump_logs(logs)
    text = dump_logs(logs)
    assert text.count("data re-split on resume") == 4 + 2 + 2, text  # every rank of the three resumed legs

    batches, resumes = _records(run)
    # exactly once within the epoch of the changes: every batch full, no key twice, none lost
    epoch0 = [b for b in batches if b["epoch"] == 0]
    per_batch: dict[int, list[str]] = {}
    for b in epoch0:
        per_batch.setdefault(b["batch"], []).extend(b["keys"])
    assert sorted(per_batch) == list(range(bpe))
    assert all(len(k) == GLOBAL_BATCH for k in per_batch.values())
    keys = [k for ks in per_batch.values() for k in ks]
    assert len(keys) == len(set(keys)) == bpe * GLOBAL_BATCH
    # who read what: the split changed at steps 3, 6 and 9
    ranks_at = {b["batch"]: 0 for b in epoch0}
    for b in epoch0:
        ranks_at[b["batch"]] += 1
    assert [ranks_at[i] for i in range(bpe)] == [2] * 3 + [4] * 3 + [2] * (bpe - 6)
    # the next epoch: the last split, full batches, no key twice
    epoch1 = [k for b in batches if b["epoch"] == 1 for k in b["keys"]]
    assert len(epoch1) == len(set(epoch1)) == 2 * GLOBAL_BATCH

    # steps continue (each logged once), lr follows the one schedule, optimizer state is the saved one
    recs = logged_steps(run)
    assert [r["step"] for r in recs] == list(range(1, num_steps + 1))
    from largessl.config import load_config, plan_run
    from largessl.train.schedules import warmup_cosine

    cfg = load_config(None, [*common])
    plan = plan_run(cfg, 2, manifest.num_samples, steps_per_epoch=bpe)
    for r in recs:
        expected = plan.lr * warmup_cosine(r["step"] - 1, plan.warmup_steps, num_steps, cfg.optim.final_lr_ratio)
        assert r["lr"] == pytest.approx(expected, rel=1e-9)
    by_step = {}
    for r in resumes:
        by_step.setdefault(r["step"], []).append(r)
    assert sorted(by_step) == [0, 3, 6, 9]
    for step, rows in by_step.items():
        assert all(r["resumed"] == (step > 0) for r in rows)
        if step:
            saved = load_training_checkpoint(run / "checkpoints" / f"step-{step:08d}")
            assert {r["optimizer"] for r in rows} == {optimizer_digest(saved["optimizer"])}
            assert saved["step"] == step and len(saved["optimizer"]["state"]) > 0


LEGS = [(2, 3), (1, 6), (2, 0)]
"""(ranks, stop at step; 0 = to the end) of the DeepSpeed resume test: one epoch on 2, then 1, then 2 ranks."""


def _legs_args(digits: str, run: Path, num_steps: int) -> list[str]:
    return ["model.arch=repro_convnet", "method.projector=32-32", "data.augment=small", "data.image_size=16",
            f"data.train_manifest={digits}", "data.shuffle_buffer=40", "data.num_workers=0",
            f"train.global_batch_size={GLOBAL_BATCH}", f"train.num_steps={num_steps}", "train.log_every=1",
            "train.collapse_every=1000", "train.deterministic=true", "optim.warmup_epochs=0.2",
            "log.progress=false", "log.tensorboard=false", "eval.online_probe=false",
            "checkpoint.every_steps=1000", "checkpoint.keep=10", f"train.run_dir={run}"]


def _run_legs(args: list[str], logs: Path) -> None:
    for world, stop_at in LEGS:
        codes = wait_all(_launch(world, [str(stop_at), *args], logs), timeout=500)
        assert codes == [75 if stop_at else 0] * world, dump_logs(logs)


@pytest.fixture(scope="module")
def ddp_legs_losses(digits: str, tmp_path_factory) -> list[float]:
    """The losses of the same legs under DDP, whose resume on another world size is tested above."""
    from largessl.data.manifest import read_manifest

    tmp = tmp_path_factory.mktemp("ddp-legs")
    (tmp / "logs").mkdir()
    _run_legs(_legs_args(digits, tmp / "run", read_manifest(digits).num_samples // GLOBAL_BATCH), tmp / "logs")
    return [r["loss"] for r in logged_steps(tmp / "run")]


@pytest.mark.slow  # minutes on 2 cores: CI runs it (make test-slow), make test does not
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_resumes_2_to_1_to_2_ranks_with_the_exact_state(digits: str, tmp_path: Path, stage: int,
                                                                        ddp_legs_losses: list[float]) -> None:
    """ZeRO-1/2 through the real trainer: 2 ranks stop at step 3, 1 rank resumes (DeepSpeed's universal
    checkpoint re-partitions the optimizer state) and stops at 6, 2 ranks resume and finish the epoch. The whole
    state (fp32 weights, LARS momentum, batch-norm buffers) after each resume is bitwise the one saved, and the
    losses are those of the same legs under DDP."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    import torch
    from zero_state import assemble

    from largessl.data.manifest import read_manifest

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bpe = read_manifest(digits).num_samples // GLOBAL_BATCH  # 11: the run is one whole epoch
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    _run_legs([*_legs_args(digits, run, bpe), "dist.strategy=deepspeed", f"dist.zero_stage={stage}"], logs)
    text = dump_logs(logs)
    assert text.count("data re-split on resume") == 1 + 2, text
    assert text.count(f"DeepSpeed ZeRO-{stage} state of 2 rank(s) re-partitioned for 1 rank(s)") == 1, text
    assert text.count(f"DeepSpeed ZeRO-{stage} state of 1 rank(s) re-partitioned for 2 rank(s)") == 1, text  # rank 0 logs it

    # every sample of the epoch exactly once, on the split of the leg that read it
    batches, resumes = _records(run)
    per_batch: dict[int, list[str]] = {}
    for b in batches:
        per_batch.setdefault(b["batch"], []).extend(b["keys"])
    assert sorted(per_batch) == list(range(bpe)) and all(len(k) == GLOBAL_BATCH for k in per_batch.values())
    keys = [k for ks in per_batch.values() for k in ks]
    assert len(keys) == len(set(keys)) == bpe * GLOBAL_BATCH
    ranks_at = {i: sum(1 for b in batches if b["batch"] == i) for i in range(bpe)}
    assert [ranks_at[i] for i in range(bpe)] == [2] * 3 + [1] * 3 + [2] * (bpe - 6)
    # steps continue, each logged once
    recs = logged_steps(run)
    assert [r["step"] for r in recs] == list(range(1, bpe + 1))
    # The same legs under DDP train on the same batches: equal losses up to float32 reduction order (gloo's
    # all-reduce there, DeepSpeed's reduce-scatter here); measured 8e-8 relative after 11 steps, bound 1e-5.
    assert [r["loss"] for r in recs] == pytest.approx(ddp_legs_losses, rel=1e-5)
    assert sorted({(r["step"], r["world_size"]) for r in resumes}) == [(0, 2), (3, 1), (6, 2)]

    # the state each resumed leg starts from is bitwise the state the previous leg saved
    def state(when: str, step: int, world: int) -> dict[str, torch.Tensor]:
        files = [run / "record" / f"zero-{when}-step{step}-w{world}-rank{r}.pt" for r in range(world)]
        return assemble([torch.load(f, weights_only=False) for f in files])

    for step, old, new in [(3, 2, 1), (6, 1, 2)]:
        before, after = state("saved", step, old), state("resumed", step, new)
        assert sorted(before) == sorted(after)
        assert {k.rsplit("/", 1)[1] for k in before} == {"fp32", "mu", "value"}  # LARS momentum, BN buffers
        different = [k for k in before if not torch.equal(before[k], after[k])]
        assert not different, different


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_deepspeed_refuses_a_zero_stage_change_before_any_step(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    from train_procs import TINY

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logs, run = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    args = ["64", *TINY, f"train.run_dir={run}", "train.global_batch_size=8", "dist.strategy=deepspeed",
            "train.num_steps=2"]
    first = _launch(1, [*args, "dist.zero_stage=2"], logs, "synthetic_stream.py")
    assert wait_all(first) == [0], dump_logs(logs)
    codes = wait_all(_launch(1, [*args, "--allow-change=dist.zero_stage", "--allow-change=train.num_steps",
                                 "dist.zero_stage=1",
                                 "train.num_steps=4"], logs, "synthetic_stream.py"))
    text = dump_logs(logs)
    assert codes[0] != 0 and "written by DeepSpeed ZeRO stage 2, this run uses dist.zero_stage=1" in text, text
    assert "Relaunch with dist.zero_stage=2" in text
    assert [r["step"] for r in logged_steps(run)] == [1, 2]  # nothing trained, nothing saved
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]
