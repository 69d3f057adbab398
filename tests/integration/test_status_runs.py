"""``largessl status`` on real ``largessl pretrain`` processes: running (with an ETA), requeued after SIGTERM,
finished after the rerun, died after SIGKILL, failed with the divergence exit code and its reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import cli_runs
import pytest

from largessl.run import exit_codes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _status(*args: str) -> tuple[list[dict], str]:
    """(the --json rows, the table) from the real command."""
    cmd = [sys.executable, "-m", "largessl", "status"]
    env = cli_runs.env_for(0, 1, 0)
    rows = json.loads(subprocess.run([*cmd, "--json", *args], capture_output=True, text=True, check=True,
                                     env=env, cwd=cli_runs.ROOT).stdout)
    table = subprocess.run([*cmd, *args], capture_output=True, text=True, check=True, env=env,
                           cwd=cli_runs.ROOT).stdout
    return rows, table


def test_status_follows_a_run_through_its_life(tmp_path: Path, digits: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    run, killed, diverged = tmp_path / "runs" / "a", tmp_path / "runs" / "b", tmp_path / "runs" / "c"
    base = [*cli_runs.SMALL, f"data.train_manifest={digits}", "data.num_workers=0", "checkpoint.every_steps=2"]
    (proc,) = cli_runs.start([*base, f"train.run_dir={run}", "train.num_steps=600"], logs)
    try:
        cli_runs.wait_for_step(run, 3, [proc])
        (row,), table = _status(str(run))
        assert row["state"] == "running" and row["num_steps"] == 600 and row["step"] >= 3, row
        assert row["eta_s"] is not None and row["loss"] is not None and row["images_per_s"] > 0
        assert "running" in table.splitlines()[1] and "/600" in table
        proc.send_signal(signal.SIGTERM)  # the scheduler's preemption notice
        (code,) = cli_runs.wait([proc])
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == exit_codes.REQUEUE, cli_runs.logs(logs)
    (row,), table = _status(str(run))
    assert row["state"] == "requeued" and row["exit_code"] == 75 and row["checkpoint"]["step"] == row["step"]
    assert "requeued (75)" in table

    (proc,) = cli_runs.start([*base, f"train.run_dir={run}", "train.num_steps=600"], logs)  # the requeued job
    assert cli_runs.wait([proc]) == [0], cli_runs.logs(logs)
    (row,), _ = _status(str(run))
    assert row["state"] == "finished" and row["step"] == 600 and row["checkpoint"]["step"] == 600

    (proc,) = cli_runs.start([*base, f"train.run_dir={killed}", "train.num_steps=400"], logs)
    cli_runs.wait_for_step(killed, 3, [proc])
    proc.kill()  # OOM killer or node loss: no word from the process
    proc.wait()
    (proc,) = cli_runs.start([*base, f"train.run_dir={diverged}", "train.num_steps=50", "optim.base_lr=1e30"], logs)
    assert cli_runs.wait([proc]) == [exit_codes.DIVERGED], cli_runs.logs(logs)

    rows, table = _status("--root", str(tmp_path / "runs"))
    by = {Path(r["run_dir"]).name: r for r in rows}
    assert [by[k]["state"] for k in "abc"] == ["finished", "died", "failed"]
    assert by["c"]["exit_code"] == exit_codes.DIVERGED and "diverged" in by["c"]["reason"]
    assert "failed (4)" in table and "without a word" in table
    print(table)
