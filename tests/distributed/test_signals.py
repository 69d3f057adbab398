"""Signals: a stop signal delivered to one rank only → every rank saves after the same step → exit 75 → resume.

Which process received what is recorded by each process itself (``run_probes``: the kernel's delivery,
observed with ``signal.set_wakeup_fd``, independent of the trainer's handler), so the test proves the other
rank stopped because the ranks agreed, not because it was signalled too.
"""

from __future__ import annotations

import signal
import time

from run_probes import read_records
from train_procs import TINY, dump_logs, launch, logged_steps, probe_env, wait_all, wait_for_step

from largessl.run import exit_codes
from largessl.run.checkpoint import find_latest_checkpoint, load_rank_state, verify_checkpoint

STOP_NAMES = {s.name for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}


def _received(records: list[dict]) -> list[str]:
    return [r["signal"] for r in records if r["event"] == "signal" and r["signal"] in STOP_NAMES]


def _trained_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["event"] == "batch"]


def test_signal_on_one_rank_saves_on_all_and_requeues(tmp_path):
    logs, rec = tmp_path / "logs", tmp_path / "records"
    logs.mkdir()
    run = tmp_path / "run"
    # A short collective timeout: without agreement the ranks' collectives diverge, and the test should fail
    # within a minute instead of waiting the default 30.
    args = [*TINY, f"train.run_dir={run}", "train.global_batch_size=8", "checkpoint.every_steps=1000",
            "dist.timeout_minutes=1"]
    procs = launch(2, 64, [*args, "train.num_steps=400"], logs, env=probe_env(rec))
    wait_for_step(run, 3, procs)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told, as when a scheduler signals one task
    # Keep signalling rank 1 (only) while it saves: repeated signals must not disturb the checkpoint.
    deadline = time.monotonic() + 120
    while procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        if procs[1].poll() is None:
            procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs, timeout=180)
    r0, r1 = read_records(rec, 0), read_records(rec, 1)
    context = f"codes {codes}\nrank 0: {r0[-3:]}\nrank 1: {r1[-3:]}\n{dump_logs(logs)}"

    # Exactly one process received a stop signal, and it was rank 1 (pid checked against the one we signalled).
    assert _received(r1)[:1] == ["SIGUSR1"], context
    assert {r["pid"] for r in r1 if r["event"] == "signal"} == {procs[1].pid}
    assert _received(r0) == [], f"rank 0 must not have been signalled: {_received(r0)}"
    assert codes == [exit_codes.REQUEUE] * 2, context

    # Both ranks trained the same steps and stopped after the same one, which is the saved one.
    s0, s1 = _trained_steps(r0), _trained_steps(r1)
    assert s0 == s1 and s0 == list(range(1, len(s0) + 1)), (s0, s1)
    last = s0[-1]
    assert 3 <= last < 400
    assert max(r["step"] for r in logged_steps(run)) == last
    ckpt = find_latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.endswith(f"step-{last:08d}"), (ckpt, last)
    marker = verify_checkpoint(ckpt)
    assert {"rank-00000.pt", "rank-00001.pt", "model.safetensors"} <= set(marker["files"])
    for rank in (0, 1):  # each rank wrote its own state into the stop checkpoint
        assert load_rank_state(ckpt, rank)["rank"] == rank

    # The same command (with a reachable end) continues from the saved step.
    assert wait_all(launch(2, 64, [*args, "--allow-change=train.num_steps", f"train.num_steps={last + 3}"], logs, env=probe_env(rec)),
                    timeout=300) == [0, 0], dump_logs(logs)
    steps = [r["step"] for r in logged_steps(run)]
    assert steps == list(range(1, last + 4))
    assert _trained_steps(read_records(rec, 0))[len(s0):] == [last + 1, last + 2, last + 3]
