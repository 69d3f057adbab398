"""A 2×2 sweep of tiny CPU runs on the real single-node SLURM cluster: one job array, each member its own run
directory, one member requeued mid-run resumes without lost or repeated steps, a second submission while the array
is queued is refused, and ``largessl sweep status`` shows the table (with the SLURM states) and writes the plot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster, wait_for  # noqa: F401  (fixture)

from largessl.launch import slurm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NUM_STEPS = 24
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _config(tmp_path: Path) -> Path:
    from largessl.data.digits import write_digits_shards

    train, val = write_digits_shards(str(tmp_path / "data"), image_size=16)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{arch: repro_convnet}}
data: {{image_size: 16, num_workers: 0, augment: small, shuffle_buffer: 16, train_manifest: {train},
        val_manifest: {val}}}
method: {{projector: "32-32"}}
train: {{global_batch_size: 16, num_steps: {NUM_STEPS}, log_every: 1, device: cpu, collapse_every: 1000}}
optim: {{warmup_epochs: 1}}
checkpoint: {{every_steps: 2}}
log: {{tensorboard: false, progress: false}}
eval: {{online_probe: false, cache_features: true, linear_epochs: 5}}
stages: [knn, linear]
""")
    return cfg


def test_sweep_is_one_job_array_whose_members_requeue_and_report(slurm_cluster: SlurmCluster,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    d = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "largessl", "sweep", "slurm", "--config", str(_config(tmp_path)),
           "--grid", "optim.base_lr=0.05,0.5", "--grid", "method.lambd=0.002,0.02", "--dir", str(d),
           "--parallel", "2", "--cpus-per-task", "1", "--time", "20", "--partition", slurm_cluster.partition]
    sub = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr[-3000:]
    print(sub.stdout)
    array = re.search(r"submitted SLURM job array (\d+) \(4 members, at most 2 at once\)", sub.stdout).group(1)
    record = json.loads((d / "sweep.json").read_text())
    tasks = record["job"]["tasks"]
    assert tasks == [f"{array}_{i}" for i in range(4)] and record["target"] == "slurm"
    runs = [Path(m["run_dir"]) for m in record["members"]]
    try:
        # the same sweep again while its array is queued would run every member twice
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and "still in the SLURM queue" in again.stderr, again.stderr[-2000:]

        # requeue member 0 mid-run (what a preemption does to one array task): it saves, is requeued, resumes
        wait_for(lambda: len(_steps(runs[0])) >= 3, 400, "member 0's first steps")
        subprocess.run(["scontrol", "requeue", tasks[0]], check=True, timeout=60)
        wait_for(lambda: slurm_cluster.job_field(tasks[0], "Restarts") == "1", 300, "member 0 to be requeued")
        wait_for(lambda: all(slurm.job_state(t) in DONE for t in tasks), 900, "every member to finish")
    finally:
        subprocess.run(["scancel", array], timeout=60)
    states = {t: slurm.job_state(t) for t in tasks}
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((d / "slurm").rglob("*_log.*")))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs[-4000:]}"
    member0 = "\n".join(p.read_text(errors="replace") for p in sorted((d / "slurm" / tasks[0]).glob("*_log.*")))
    assert re.search(r"resumed from \S+ at step \d+", member0), member0[-4000:]
    for run in runs:
        assert _steps(run) == list(range(1, NUM_STEPS + 1)), f"{run}: steps lost or repeated"
        assert (run / "eval" / "knn.json").is_file() and (run / "eval" / "linear.json").is_file()

    status = subprocess.run([sys.executable, "-m", "largessl", "sweep", "status", str(d), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["members"]
    assert [r["values"] for r in rows] == [{"optim.base_lr": lr, "method.lambd": lam}
                                           for lr in ("0.05", "0.5") for lam in ("0.002", "0.02")]
    for r, task in zip(rows, tasks):
        assert r["state"] == "finished" and r["knn"] is not None and r["linear"] is not None, r
        assert r["slurm"]["job_id"] == task and r["slurm"]["state"] == "COMPLETED", r
    assert rows[0]["slurm"]["restarts"] == 1
    table = subprocess.run([sys.executable, "-m", "largessl", "sweep", "status", str(d)], capture_output=True,
                           text=True, timeout=120).stdout
    print(table)
    assert f"4 members, 4 finished (SLURM array {array})" in table
    assert f"finished, slurm {tasks[3]} COMPLETED" in table
    png = d / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
