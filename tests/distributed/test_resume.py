"""Exact resume: a run SIGKILLed at a random step and restarted ends bitwise-identical to an uninterrupted run."""

from __future__ import annotations

import random
import signal

import pytest
import torch
from train_procs import TINY, dump_logs, launch, logged_steps, wait_all, wait_for_step

from largessl.train.checkpoint import load_model_state

NUM_STEPS = 10


def _run(world: int, run_dir, log_dir) -> list[int]:
    return wait_all(launch(world, 64, [*TINY, f"train.run_dir={run_dir}", f"train.num_steps={NUM_STEPS}",
                                       "train.global_batch_size=8"], log_dir))


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_and_restart_is_bitwise_identical(world, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert _run(world, ref, logs) == [0] * world, dump_logs(logs)

    kill_at = random.Random(world).randint(2, NUM_STEPS - 2)
    procs = launch(world, 64, [*TINY, f"train.run_dir={resumed}", f"train.num_steps={NUM_STEPS}",
                               "train.global_batch_size=8"], logs)
    wait_for_step(resumed, kill_at, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    wait_all(procs)
    killed_at = max(r["step"] for r in logged_steps(resumed))
    assert killed_at < NUM_STEPS, "the run finished before it could be killed; the test proves nothing"
    assert _run(world, resumed, logs) == [0] * world, dump_logs(logs)

    w_ref, _, meta_ref = load_model_state(ref)
    w_res, _, meta_res = load_model_state(resumed)
    assert meta_ref["step"] == meta_res["step"] == NUM_STEPS
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), f"{k} differs after resume (killed at step {killed_at})"
    ref_loss = [(r["step"], r["loss"]) for r in logged_steps(ref)]
    res_loss = [(r["step"], r["loss"]) for r in logged_steps(resumed)]
    assert [s for s, _ in res_loss] == list(range(1, NUM_STEPS + 1))  # none repeated or lost
    assert res_loss == ref_loss
