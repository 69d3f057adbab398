"""Exact resume on the real shard stream: ``largessl pretrain`` SIGKILLed at a drawn step and rerun ends with the
same weights and trained on the same sample keys, step by step, as an uninterrupted run.

Digits shards (90 train samples in 7 uneven shards), global batch 16: 5 steps per epoch, so 12 steps cross
two epoch boundaries and the kill lands anywhere from mid-epoch to an epoch end, mid-step or mid-save.
Each rank records the keys of every batch the stream hands to the trainer (``run_probes``).
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch
from run_probes import read_records
from train_procs import (
    SHARDS_TINY,
    dump_logs,
    launch_pretrain,
    logged_steps,
    probe_env,
    wait_all,
    wait_for_step,
    write_small_digits,
)

from largessl.run.checkpoint import load_model_state

NUM_STEPS = 12
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 90 // GLOBAL_BATCH  # 5; the 10 samples left over are dropped each epoch


def _global_batch(world: int) -> int:
    """16 (divisible by 1 and 2 ranks), or 18 on 3 ranks: 5 steps per epoch either way."""
    return 18 if world == 3 else GLOBAL_BATCH
SAVE_EVERY = 2
"""Checkpoints at steps 2, 4, 6, 8 (mid-epoch) and 5, 10 (epoch ends): most kills resume mid-epoch, where the
stream must drop the samples already trained, some at an epoch start."""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_small_digits(tmp_path_factory.mktemp("digits"))


def _keys_by_pid(records: list[dict]) -> list[list[tuple[int, list[str]]]]:
    """Per process (in start order): the (step, keys) of every batch it was handed."""
    runs: dict[int, list[tuple[int, list[str]]]] = {}
    for r in records:
        if r["event"] == "batch":
            runs.setdefault(r["pid"], []).append((r["step"], r["keys"]))
    return list(runs.values())


# 3 ranks: DDP's ring all-reduce then sums in an order that depends on the gradient bucket layout, which DDP
# rebuilds after each process's first backward (Trainer._settle_buckets); 2 ranks add two numbers, commutatively.
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 1), (2, 0), (2, 1),
                                                pytest.param(3, 0, marks=pytest.mark.slow)])
def test_sigkill_and_restart_is_bitwise_identical(world, workers, manifest, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    rec_ref, rec_res = tmp_path / "rec-ref", tmp_path / "rec-resumed"
    args = [*SHARDS_TINY, f"data.train_manifest={manifest}", f"data.num_workers={workers}",
            f"train.global_batch_size={_global_batch(world)}", f"train.num_steps={NUM_STEPS}",
            f"checkpoint.every_steps={SAVE_EVERY}"]
    rng = random.Random(f"resume-{world}-{workers}")
    # After the first checkpoint (so the rerun resumes) and not at an epoch end: the newest checkpoint is then
    # mostly mid-epoch, where the stream must drop what was trained; kills landing 1-2 steps later can still
    # resume at an epoch end.
    kill_at = rng.choice([s for s in range(3, NUM_STEPS - 2) if s % STEPS_PER_EPOCH])
    delay = rng.uniform(0.0, 0.3)

    # The uninterrupted run and the one to be killed run side by side (they share nothing but the shards).
    ref_procs = launch_pretrain(world, [*args, f"train.run_dir={ref}"], logs, probe_env(rec_ref))
    # The killed run cannot pass step kill_at + 2: the kill lands within those steps (checkpoint writes too).
    procs = launch_pretrain(world, [*args, f"train.run_dir={resumed}"], logs, probe_env(rec_res, kill_at + 2))
    wait_for_step(resumed, kill_at, procs)
    time.sleep(delay)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert wait_all(procs, timeout=60) == [-signal.SIGKILL] * world
    assert wait_all(ref_procs, timeout=300) == [0] * world, dump_logs(logs)
    killed_at = max(r["step"] for r in logged_steps(resumed))
    assert kill_at <= killed_at <= kill_at + 2
    assert wait_all(launch_pretrain(world, [*args, f"train.run_dir={resumed}"], logs, probe_env(rec_res)),
                    timeout=300) == [0] * world, dump_logs(logs)
    context = f"world {world}, workers {workers}, killed after step {killed_at}"

    w_ref, _, meta_ref = load_model_state(ref)
    w_res, _, meta_res = load_model_state(resumed)
    assert meta_ref["step"] == meta_res["step"] == NUM_STEPS
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), f"{k} differs after resume ({context})"
    ref_loss = [(r["step"], r["loss"]) for r in logged_steps(ref)]
    res_loss = [(r["step"], r["loss"]) for r in logged_steps(resumed)]
    assert [s for s, _ in res_loss] == list(range(1, NUM_STEPS + 1))  # none repeated or lost
    assert res_loss == ref_loss, context

    for rank in range(world):
        (reference,) = _keys_by_pid(read_records(rec_ref, rank))
        assert [s for s, _ in reference] == list(range(1, NUM_STEPS + 1))
        first_epoch = [k for s, keys in reference if s <= STEPS_PER_EPOCH for k in keys]
        assert len(set(first_epoch)) == len(first_epoch) == STEPS_PER_EPOCH * _global_batch(world) // world
        first, second = _keys_by_pid(read_records(rec_res, rank))
        resume_step = second[0][0] - 1
        # The rerun continues after the newest complete checkpoint (the one before, when the kill hit the
        # save of step killed_at): it seeks there, it neither replays from the epoch start nor skips.
        saves = [0] + [s for s in range(1, NUM_STEPS) if s % SAVE_EVERY == 0 or s % STEPS_PER_EPOCH == 0]
        assert resume_step in {max(s for s in saves if s <= killed_at), max(s for s in saves if s < killed_at)}, \
            (resume_step, context)
        assert [s for s, _ in second] == list(range(resume_step + 1, NUM_STEPS + 1)), context
        assert [s for s, _ in first] == list(range(1, len(first) + 1)) and len(first) >= resume_step, context
        # Every batch of both processes, including steps the killed one trained and lost, holds the same keys
        # as the uninterrupted run's batch of that step.
        want = dict(reference)
        for step, keys in first + second:
            assert keys == want[step], f"rank {rank} step {step}: {keys} != {want[step]} ({context})"
        assert first[:resume_step] + second == reference, context
