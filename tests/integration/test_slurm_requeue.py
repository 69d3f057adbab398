"""A tiny CPU pretraining job on a real single-node SLURM cluster: requeued and preempted mid-run, it resumes.

Submitted with ``largessl launch slurm`` (submitit), requeued with ``scontrol requeue`` (SIGTERM to every
task), then sent the preemption signal (``scancel --signal=USR2``, what ``--signal=USR2@N`` sends before a
time-out); every step must appear exactly once in metrics.jsonl and the job must complete.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster, wait_for  # noqa: F401  (fixture)

from largessl.launch import slurm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_STEPS = 10


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*")))


def _tiny_config(tmp_path: Path) -> Path:
    from largessl.data.digits import write_digits_shards

    train, val = write_digits_shards(str(tmp_path / "data"), image_size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{arch: resnet18, small_input: true}}
data: {{image_size: 32, num_workers: 0, train_manifest: {train}, val_manifest: {val}}}
method: {{projector: "64-64"}}
train: {{global_batch_size: 16, num_steps: {NUM_STEPS}, log_every: 1, device: cpu}}
checkpoint: {{every_steps: 2}}
log: {{tensorboard: false, progress: false}}
""")
    return cfg


def test_requeue_and_preemption_resume_without_lost_or_repeated_steps(slurm_cluster: SlurmCluster,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "largessl", "launch", "slurm", "--config", str(_tiny_config(tmp_path)),
           "--nodes", "1", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "20",
           "--partition", slurm_cluster.partition, f"train.run_dir={run_dir}"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    script = dry.stdout.split("\n# each task runs:")[0].strip()
    assert "#SBATCH --requeue" in script and "#SBATCH --ntasks-per-node=2" in script

    sub = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr
    print(sub.stdout)
    job = re.search(r"submitted SLURM job (\d+)", sub.stdout).group(1)
    folder = run_dir / "slurm" / job
    assert f"run dir: {run_dir}" in sub.stdout and str(folder / f"{job}_0_log.out") in sub.stdout
    # --dry-run printed exactly the script that was submitted (up to the job id placeholder)
    assert (folder / f"{job}_submission.sh").read_text().strip() == script

    try:
        # 1) requeue mid-run: SLURM sends SIGTERM to every task, the trainer saves and exits 75
        wait_for(lambda: len(_steps(run_dir)) >= 2, 300, "the first steps of the first run")
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        wait_for(lambda: slurm_cluster.job_field(job, "Restarts") == "1"
                 and slurm_cluster.job_field(job, "JobState") == "RUNNING", 300, "the requeued job to restart")
        first_stop = len(_steps(run_dir))
        # a step after the resume proves the trainer (and its signal handlers) is running again
        wait_for(lambda: len(_steps(run_dir)) > first_stop, 300, "a step after the first resume")

        # 2) preemption / time-out warning: USR2 to every task; rank 0 requeues the job itself
        assert len(_steps(run_dir)) < NUM_STEPS, "the job finished before it could be preempted"
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
        wait_for(lambda: slurm_cluster.job_field(job, "Restarts") == "2", 300, "the preempted job to requeue")
        # job_state asks scontrol: this cluster has no accounting database for submitit's sacct polling
        wait_for(lambda: slurm.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 400, "the job to finish")
    finally:
        if slurm_cluster.job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job], timeout=60)
    logs = _logs(folder)
    state = slurm_cluster.job_field(job, "JobState")
    assert state == "COMPLETED", f"job {job} ended {state}:\n{logs[-4000:]}"
    resumed = sorted(set(re.findall(r"resumed from \S+ at step \d+", logs)))
    print("\n".join(resumed))  # the CI log shows the resumed steps
    assert len(resumed) == 2, logs[-4000:]
    assert "received SIGTERM" in logs and "received SIGUSR2" in logs
    assert f"requeued SLURM job {job}" in logs  # rank 0's own requeue after the preemption signal
    steps = _steps(run_dir)
    assert steps == list(range(1, NUM_STEPS + 1)), f"steps lost or repeated: {steps}"
    # `largessl status` names the job (the run recorded SLURM_JOB_ID) and asks SLURM about it
    status = subprocess.run([sys.executable, "-m", "largessl", "status", "--json", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["state"] == "finished" and row["scheduler"]["slurm_job_id"] == job, row
    assert row["slurm"] == {"job_id": job, "state": "COMPLETED", "restarts": 2, "source": "scontrol"}, row
    table = subprocess.run([sys.executable, "-m", "largessl", "status", str(run_dir)], capture_output=True,
                           text=True, timeout=120).stdout
    print(table)
    assert f"finished, slurm {job} COMPLETED" in table
