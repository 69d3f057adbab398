"""SLURM launch planning without a cluster: time parsing, the sbatch script, the job callable, stages."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

from largessl.cli import main
from largessl.launch import slurm
from largessl.run import exit_codes


@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:00", 30), ("2:00:00", 120), ("1-00:00:00", 1440),
                                          ("1-2", 1560), ("0:30:30", 31), (45, 45)])
def test_parse_time(text: str | int, minutes: int) -> None:
    assert slurm.parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "two hours", "1:2:3:4", "0"])
def test_parse_time_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="--time"):
        slurm.parse_time(bad)


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"train: {{run_dir: {tmp_path / 'run'}, num_steps: 10}}\nstages: [knn, linear]\n"
                 "data: {train_manifest: s3://b/train/manifest.json, val_manifest: s3://b/val/manifest.json}\n")
    return p


def test_gpu_plan_one_task_per_gpu_and_stage_jobs(cfg_file: Path, tmp_path: Path) -> None:
    # offline: s3://b is not reachable here (the submit-time checks are tested in test_submit_checks.py)
    plan = slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], overrides=["optim.base_lr=0.3"], nodes=2,
                                             gpus_per_node=8, cpus_per_task=10, partition="gpu", account="ssl",
                                             qos="high", time_min=120, mem_gb=480, offline=True))
    script = slurm.render_sbatch(plan)
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=gpu", "--account=ssl", "--qos=high", "--time=120", "--mem=480GB", "--requeue",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    assert "export OMP_NUM_THREADS=10" in script and "srun --unbuffered" in script
    assert f"-m submitit.core._submit {tmp_path / 'run' / 'slurm' / '%j'}" in script
    # the job runs the CLI with absolute paths; stages become afterok jobs instead of running in every task
    assert plan.pretrain_argv[:3] == ["pretrain", "--config", str(cfg_file.resolve())]
    assert f"train.run_dir={tmp_path / 'run'}" in plan.pretrain_argv and "stages=[]" in plan.pretrain_argv
    assert "optim.base_lr=0.3" in plan.pretrain_argv
    assert [c[3:5] for c in plan.stage_commands] == [["eval", "knn"], ["eval", "linear"]]


def test_cpu_plan_and_no_stage_jobs(cfg_file: Path) -> None:
    plan = slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], tasks_per_node=4, submit_stages=False,
                                             offline=True))
    script = slurm.render_sbatch(plan)
    assert "#SBATCH --ntasks-per-node=4\n" in script and "gpus" not in script
    assert plan.stage_commands == [] and "stages=[]" not in plan.pretrain_argv


def test_bad_requests_fail_before_anything_runs(cfg_file: Path) -> None:
    with pytest.raises(ValueError, match="--nodes"):
        slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], nodes=0))
    with pytest.raises(ValueError, match="unknown config key"):
        slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], overrides=["train.nope=1"]))
    with pytest.raises(ValueError, match="shared filesystem"):
        slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], overrides=["train.run_dir=s3://b/r"]))


def test_dry_run_cli_prints_script(cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["launch", "slurm", "--config", str(cfg_file), "--nodes", "1", "--gpus-per-node", "2",
                 "--time", "1:00:00", "--dry-run", "--offline"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("#!/bin/bash") and "#SBATCH --time=60\n" in out
    assert "# then (afterok):" in out and "# each task runs: largessl pretrain" in out


def test_submit_without_slurm_is_an_environment_error(cfg_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch here
    assert main(["launch", "slurm", "--config", str(cfg_file), "--offline"]) == exit_codes.ENVIRONMENT


def test_pretrain_job_pickles_and_checkpoint_resubmits_itself() -> None:
    job = slurm.PretrainJob(["pretrain", "--config", "/x.yaml"])
    again = pickle.loads(pickle.dumps(job))
    assert again.argv == job.argv
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == ()


def test_stage_job_fails_on_nonzero_exit() -> None:
    assert slurm.StageJob([sys.executable, "-c", "pass"])() == 0
    with pytest.raises(RuntimeError, match="exited with 3"):
        slurm.StageJob([sys.executable, "-c", "raise SystemExit(3)"])()


def test_pretrain_job_ends_the_task_with_the_trainers_exit_code(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a one-task SLURM environment as srun sets it (submitit exports RANK, MASTER_ADDR, ...: set here so that
    # monkeypatch restores them)
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "MASTER_PORT": "29555", "RANK": "", "WORLD_SIZE": "", "LOCAL_RANK": "", "LOCAL_WORLD_SIZE": "",
           "MASTER_ADDR": ""}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    job = slurm.PretrainJob(["pretrain", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as raised:  # not an exception: submitit would end the task with 1
        job()
    assert raised.value.code == exit_codes.BAD_INPUT
