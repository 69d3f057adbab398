"""Two nodes of a real SLURM cluster: a CPU pretraining job on 2 nodes x 2 tasks, requeued, and a node lost mid-run.

The cluster's ``pair`` partition is two ``slurmd -N`` daemons on this host (tests/slurm_cluster.py), so the job's
node list is ``n[1-2]`` and the ranks meet at ``n1``: rendezvous comes from SLURM's node list and ids, both through
``largessl launch slurm`` (submitit exports RANK/MASTER_ADDR from them) and through a plain ``sbatch`` + ``srun``
script (the trainer reads SLURM_PROCID, SLURM_NTASKS and SLURM_JOB_NODELIST itself).

A node failure is ``n2``'s slurmd, its slurmstepd and its tasks SIGKILLed at once, like a machine losing power.
The ranks on ``n1`` must end with exit code 3 within the documented bound (``dist.timeout_minutes +
min(dist.timeout_minutes, 1 min)``, docs/operations.md), SLURM declares ``n2`` DOWN after ``SlurmdTimeout`` and
requeues the job (``--requeue``), and the run resumes from the last complete checkpoint: on both nodes once
``n2``'s slurmd is back, or resubmitted on ``n1`` alone with world size 2. Times are printed for the CI log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import STATE, SlurmCluster, slurm_cluster, wait_for  # noqa: F401  (fixture)

from largessl.launch import slurm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TIMEOUT_MINUTES = 1.0
"""dist.timeout_minutes of these runs: the dead-peer bound is then 1 + 1 = 2 minutes."""
EXIT_BOUND_S = TIMEOUT_MINUTES * 60 + min(TIMEOUT_MINUTES * 60, 60)
T0 = time.monotonic()
LOOPBACK_ENV = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
"""The jobs inherit the submitter's environment (sbatch --export=ALL): gloo's pairs stay on the loopback device."""


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (a ``step-N/`` folder is valid once its COMPLETE.json exists)."""
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE.json"))


def _past_checkpoint(run_dir: Path, after: int) -> bool:
    """A checkpoint newer than step ``after`` exists and a step beyond it was logged (the kill then loses work)."""
    done = _checkpoints(run_dir)
    return bool(done) and done[-1] > after and len(_steps(run_dir)) > done[-1]


def _tiny_config(tmp_path: Path, num_steps: int) -> Path:
    from largessl.data.digits import write_digits_shards

    train, val = write_digits_shards(str(tmp_path / "data"), image_size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{arch: resnet18, small_input: true}}
data: {{image_size: 32, num_workers: 0, train_manifest: {train}, val_manifest: {val}}}
method: {{projector: "64-64"}}
train: {{global_batch_size: 16, num_steps: {num_steps}, log_every: 1, device: cpu}}
checkpoint: {{every_steps: 2}}
dist: {{timeout_minutes: {TIMEOUT_MINUTES}}}
log: {{tensorboard: false, progress: false}}
""")
    return cfg


def _wait_state(cluster: SlurmCluster, job: str, restarts: int, states: tuple[str, ...], timeout: float,
                what: str) -> str:
    wait_for(lambda: cluster.job_field(job, "Restarts") == str(restarts)
             and cluster.job_field(job, "JobState") in states, timeout, what)
    return cluster.job_field(job, "JobState")


def _fail_node(cluster: SlurmCluster, job: str, run_dir: Path) -> tuple[int, dict[int, float]]:
    """Kill n2 (slurmd, slurmstepd, tasks) mid-run; wait for n1's ranks to exit. Returns the last complete
    checkpoint at the kill and each survivor's seconds from the kill to its exit."""
    survivors = cluster.task_pids(job, "n1")
    victims = cluster.task_pids(job, "n2")
    assert sorted(survivors.values()) == [0, 1] and sorted(victims.values()) == [2, 3], (survivors, victims)
    steps_before = len(_steps(run_dir))
    t_kill = time.monotonic()
    killed = cluster.kill_node("n2")
    # a save in flight cannot complete without n2's ranks: the last complete checkpoint is fixed from here on
    last_ckpt = _checkpoints(run_dir)[-1]
    _say(f"node failure: SIGKILL n2's slurmd, slurmstepd and tasks (pids {killed}, ranks {sorted(victims.values())})"
         f" at step {steps_before}; last complete checkpoint: step {last_ckpt}")
    exited: dict[int, float] = {}

    def gone() -> bool:
        for pid, rank in survivors.items():
            if rank not in exited and not Path(f"/proc/{pid}").exists():
                exited[rank] = time.monotonic() - t_kill
        return len(exited) == len(survivors)

    # wait_for's limit is the bound plus time for a loaded CI machine; the measured times are printed, not asserted
    wait_for(gone, EXIT_BOUND_S + 120, "the ranks on n1 to exit after n2 died", interval=0.2)
    _say("survivors on n1 exited: " + ", ".join(f"rank {r} after {s:.1f} s" for r, s in sorted(exited.items()))
         + f" (documented bound {EXIT_BOUND_S:.0f} s)")
    return last_ckpt, exited


def _ctld_offset() -> int:
    log = STATE / "slurmctld.log"
    return log.stat().st_size if log.exists() else 0


def _ctld_log(job: str, offset: int) -> str:
    """slurmctld's lines (from byte ``offset``) on the job and on n2: the node-failure requeue as SLURM logged it."""
    log = STATE / "slurmctld.log"
    keep = re.compile(rf"JobId={job}\b.*(?:[Rr]equeu|fail|NODE)|[Rr]equeu.*JobId={job}\b|node n2|n2 .*(?:not |DOWN)")
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return "\n".join(line for line in text.splitlines() if keep.search(line))


def _resumes(logs: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)]


def _interesting(logs: str) -> str:
    keep = re.compile(r"resumed from|process group ready|received SIG|requeued SLURM job|exit|ERROR|srun: error|"
                      r"CANCELLED|NODE FAILURE|re-split|batch on|Starting with|Terminated")
    return "\n".join(line for line in logs.splitlines() if keep.search(line))


def test_submitit_two_nodes_requeue_then_node_failure_resume(slurm_cluster: SlurmCluster,  # noqa: F811
                                                              tmp_path: Path) -> None:
    """``largessl launch slurm --nodes 2 --tasks-per-node 2``: ``scontrol requeue`` resumes on both nodes; then n2
    dies, n1's ranks exit 3, SLURM requeues the job, and it resumes once n2's slurmd is back."""
    num_steps = 40
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "largessl", "launch", "slurm", "--config", str(_tiny_config(tmp_path, num_steps)),
           "--nodes", "2", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30",
           "--partition", slurm_cluster.pair_partition, f"train.run_dir={run_dir}"]
    ctld = _ctld_offset()
    sub = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=LOOPBACK_ENV)
    assert sub.returncode == 0, sub.stderr
    job = re.search(r"submitted SLURM job (\d+)", sub.stdout).group(1)
    folder = run_dir / "slurm" / job
    _say(f"submitted with submitit: {sub.stdout.splitlines()[0]}")
    try:
        wait_for(lambda: len(_steps(run_dir)) >= 2, 400, "the first steps on two nodes")
        nodes = slurm_cluster.job_field(job, "NodeList")
        _say(f"job {job} running on {nodes}, step {len(_steps(run_dir))}")
        assert nodes == "n[1-2]"

        # 1) preemption requeue: SIGTERM to every task on both nodes; they save and exit 75, the job runs again
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        _say(f"scontrol requeue {job} at step {len(_steps(run_dir))}")
        _wait_state(slurm_cluster, job, 1, ("RUNNING",), 400, "the requeued job to run again")
        first_stop = _checkpoints(run_dir)[-1]
        _say(f"requeued job running again (Restarts=1) after the save at step {first_stop}")
        wait_for(lambda: _past_checkpoint(run_dir, first_stop) and slurm_cluster.task_pids(job, "n2"), 400,
                 "a checkpoint after the resume and a step after it")
        assert len(_steps(run_dir)) < num_steps, "the job finished before the node failure"

        # 2) node failure: n2 dies mid-run
        last_ckpt, exited = _fail_node(slurm_cluster, job, run_dir)
        t_fail = time.monotonic()
        state = _wait_state(slurm_cluster, job, 2, ("PENDING",), 300, "SLURM to requeue the job after n2 failed")
        _say(f"SLURM requeued job {job} {time.monotonic() - t_fail:.1f} s after the survivors exited: {state} "
             f"({slurm_cluster.job_field(job, 'Reason')}); n2 is {slurm_cluster.node_state('n2')}")
        assert slurm_cluster.node_state("n2").startswith("down")
        slurm_cluster.start_node("n2")
        _say(f"n2's slurmd restarted: n2 is {slurm_cluster.node_state('n2')}")
        wait_for(lambda: slurm.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the job to finish")
    finally:
        if slurm_cluster.job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job], timeout=60)
        if not slurm_cluster.node_state("n2").rstrip("*") == "idle":
            slurm_cluster.start_node("n2")
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(folder.glob("*_log.*")))
    print(f"--- slurmctld.log\n{_ctld_log(job, ctld)}\n{_interesting(logs)}")
    state = slurm_cluster.job_field(job, "JobState")
    _say(f"job {job} {state}, Restarts={slurm_cluster.job_field(job, 'Restarts')}, "
         f"resumes at steps {_resumes(logs)}")
    assert state == "COMPLETED", logs[-4000:]
    assert logs.count("process group ready: gloo, rank 0 of 4") == 3, logs[-4000:]  # every start on both nodes
    assert _resumes(logs) == [first_stop, last_ckpt], logs[-4000:]
    # every survivor's trainer returned 3, and that is its task's exit code (srun reports it in the batch log)
    for rank in (0, 1):
        rank_err = (folder / f"{job}_{rank}_log.err").read_text()
        assert "largessl pretrain exited with code 3" in rank_err, rank_err[-3000:]
    assert re.search(r"srun: error: n1: tasks? [0-9,-]+: Exited with exit code 3", logs), logs[-4000:]
    assert _steps(run_dir) == list(range(1, num_steps + 1))
    assert sorted(exited) == [0, 1]


def test_sbatch_srun_two_nodes_node_failure_resumes_on_one_node(slurm_cluster: SlurmCluster,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """Plain ``sbatch`` + ``srun``, no submitit: 4 ranks from SLURM_PROCID/SLURM_NTASKS meet at the node list's first
    host; n2 dies, srun reports exit code 3 for n1's tasks, SLURM requeues the job, and while n2 stays down the
    run is resubmitted on n1 alone (world size 2) and resumes from the last checkpoint."""
    num_steps = 30
    run_dir = tmp_path / "run"
    cfg = _tiny_config(tmp_path, num_steps)
    out = tmp_path / "sbatch"
    out.mkdir()

    def sbatch(nodes: int) -> str:
        script = out / f"pretrain-{nodes}n.sh"
        script.write_text(f"""#!/bin/bash
#SBATCH --job-name=largessl-plain
#SBATCH --partition={slurm_cluster.pair_partition}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}/%j.out
export OMP_NUM_THREADS=1
echo "batch on $SLURMD_NODENAME: nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, restart ${{SLURM_RESTART_COUNT:-0}}"
srun --label {sys.executable} -m largessl pretrain --config {cfg} train.run_dir={run_dir}
echo "srun exited $?"
""")
        res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60,
                             check=True, env=LOOPBACK_ENV)
        return res.stdout.strip().split(";")[0]

    ctld = _ctld_offset()
    job = sbatch(2)
    _say(f"sbatch job {job}: 2 nodes x 2 tasks, srun python -m largessl pretrain")
    second = ""
    try:
        # a few saves first, so the resume step says which checkpoint was used
        wait_for(lambda: _past_checkpoint(run_dir, 3) and slurm_cluster.task_pids(job, "n2"), 400,
                 "the second checkpoint on two nodes and a step after it")
        assert slurm_cluster.job_field(job, "NodeList") == "n[1-2]"
        assert len(_steps(run_dir)) < num_steps, "the job finished before the node failure"
        last_ckpt, exited = _fail_node(slurm_cluster, job, run_dir)
        t_fail = time.monotonic()
        _wait_state(slurm_cluster, job, 1, ("PENDING",), 300, "SLURM to requeue the job after n2 failed")
        _say(f"SLURM requeued job {job} {time.monotonic() - t_fail:.1f} s after the survivors exited: PENDING "
             f"({slurm_cluster.job_field(job, 'Reason')}); n2 is {slurm_cluster.node_state('n2')}")
        assert slurm_cluster.node_state("n2").startswith("down")
        # n2 stays down: cancel the requeued 2-node job and resubmit the same run on n1 alone
        subprocess.run(["scancel", job], check=True, timeout=60)
        second = sbatch(1)
        _say(f"resubmitted on one node as job {second} (world size 2)")
        wait_for(lambda: slurm.job_state(second) in ("COMPLETED", "FAILED", "CANCELLED"), 600,
                 "the one-node job to finish")
    finally:
        for j in (job, second):
            if j and slurm_cluster.job_field(j, "JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
                subprocess.run(["scancel", j], timeout=60)
        if not slurm_cluster.node_state("n2").rstrip("*") == "idle":
            slurm_cluster.start_node("n2")
            _say(f"n2's slurmd restarted: n2 is {slurm_cluster.node_state('n2')}")
    first_log = (out / f"{job}.out").read_text(errors="replace")
    second_log = (out / f"{second}.out").read_text(errors="replace")
    print(f"--- slurmctld.log\n{_ctld_log(job, ctld)}\n--- {job}.out\n{_interesting(first_log)}\n--- {second}.out\n{_interesting(second_log)}")
    state = slurm_cluster.job_field(second, "JobState")
    _say(f"job {second} {state} on {slurm_cluster.job_field(second, 'NodeList')}; resumed at {_resumes(second_log)}")
    # the ranks found each other from SLURM's variables alone: the trainer's own SLURM branch, 4 then 2 ranks
    assert "process group ready: gloo, rank 0 of 4 (slurm)" in first_log
    assert re.search(r"srun: error: n1: tasks? [0-9,-]+: Exited with exit code 3", first_log), first_log[-4000:]
    assert state == "COMPLETED", second_log[-4000:]
    assert "process group ready: gloo, rank 0 of 2 (slurm)" in second_log
    assert "re-split" in second_log and _resumes(second_log) == [last_ckpt], second_log[-4000:]
    assert _steps(run_dir) == list(range(1, num_steps + 1))
    assert sorted(exited) == [0, 1]
