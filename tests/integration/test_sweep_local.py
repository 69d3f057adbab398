"""``largessl sweep local`` with real ``largessl pretrain`` members: each trains and runs its kNN stage in its own
run directory, a second call skips the finished members, and ``sweep status`` reads their numbers back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cli_runs
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "largessl", "sweep", *args], capture_output=True, text=True,
                          env=cli_runs.env_for(0, 1, 0), cwd=cli_runs.ROOT, timeout=500)


def test_local_sweep_runs_each_member_once(tmp_path: Path) -> None:
    from largessl.data.digits import write_digits_shards

    train, val = write_digits_shards(str(tmp_path / "data"), image_size=16)
    d = tmp_path / "sweep"
    base = [*cli_runs.SMALL, f"data.train_manifest={train}", f"data.val_manifest={val}", "data.num_workers=0",
            "train.num_steps=6", "stages=[knn]"]
    args = ["local", "--dir", str(d), "--grid", "optim.base_lr=0.05,0.5", *base]
    first = _sweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2/2 members finished" in first.stdout
    again = _sweep(*args)
    assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr[-3000:]

    status = _sweep("status", str(d), "--json", "--no-scheduler")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["members"]
    assert [r["values"] for r in rows] == [{"optim.base_lr": "0.05"}, {"optim.base_lr": "0.5"}]
    for r in rows:
        assert r["state"] == "finished" and r["step"] == 6 and r["knn_k"] == 20, r
        assert 10.0 < r["knn"] <= 100.0, r  # a real kNN result of each member's own checkpoint
        assert (Path(r["run_dir"]) / "checkpoints").is_dir() and Path(r["run_dir"]).parent == d
    table = _sweep("status", str(d), "--no-scheduler").stdout
    print(table)
    assert "2 members, 2 finished" in table and (d / "sweep.png").is_file()
