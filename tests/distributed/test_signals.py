"""Signals: a flag on one rank → every rank saves at the next step boundary → requeue exit code → resume."""

from __future__ import annotations

import json
import signal
import time

from train_procs import TINY, dump_logs, launch, logged_steps, wait_all, wait_for_step

from largessl import exit_codes
from largessl.train.checkpoint import MARKER, find_latest_checkpoint, verify_checkpoint


def test_signal_on_one_rank_saves_on_all_and_requeues(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", "train.global_batch_size=8", "checkpoint.every_steps=1000"]
    procs = launch(2, 64, [*args, "train.num_steps=400"], logs)
    wait_for_step(run, 3, procs)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told, as when a scheduler signals one task
    # Keep signalling both ranks while they save: repeated signals must not disturb the checkpoint.
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    codes = wait_all(procs)
    assert codes == [exit_codes.REQUEUE] * 2, dump_logs(logs)

    last = max(r["step"] for r in logged_steps(run))
    assert last < 400
    ckpt = find_latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.endswith(f"step-{last:08d}"), (ckpt, last)
    marker = verify_checkpoint(ckpt)
    assert {"rank-00000.pt", "rank-00001.pt", "model.safetensors"} <= set(marker["files"])
    assert json.loads((run / "checkpoints" / f"step-{last:08d}" / MARKER).read_text())["step"] == last
    assert "received SIGUSR1" in dump_logs(logs) or "received SIGTERM" in dump_logs(logs)

    # The same command (with a reachable end) continues from the saved step.
    assert wait_all(launch(2, 64, [*args, f"train.num_steps={last + 3}"], logs)) == [0, 0], dump_logs(logs)
    steps = [r["step"] for r in logged_steps(run)]
    assert steps == list(range(1, last + 4))
