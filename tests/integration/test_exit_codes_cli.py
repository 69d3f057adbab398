"""Exit codes as a scheduler sees them, through the real ``largessl pretrain`` process: one case per code,
the last log line, a SIGTERM to the whole process group with loader workers, and a full disk (a small tmpfs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cli_runs
import pytest

from largessl.run import exit_codes
from largessl.run.checkpoint import find_latest_checkpoint, verify_checkpoint

pytestmark = [pytest.mark.timeout(600)]


def _run(args: list[str], tmp_path: Path) -> tuple[int, str, Path]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    (proc,) = cli_runs.start(args, logs)
    (code,) = cli_runs.wait([proc])
    log = max(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)
    return code, cli_runs.last_line(log), log


def test_bad_config_is_2(tmp_path: Path, digits: str) -> None:
    code, last, _ = _run([*cli_runs.SMALL, f"data.train_manifest={digits}", "train.global_batch_size=1"], tmp_path)
    assert code == exit_codes.BAD_INPUT and "train.global_batch_size must be >= 2" in last
    code, last, _ = _run([*cli_runs.SMALL, f"data.train_manifest={digits}", "train.run_dir=s3://bucket/run"],
                         tmp_path)
    assert code == exit_codes.BAD_INPUT and "checkpoint.dir=s3://" in last


def test_storage_error_is_3_and_names_the_path(tmp_path: Path, digits: str) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should go")
    code, last, log = _run([*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={tmp_path}/run",
                            f"checkpoint.dir={blocker}/checkpoints", "train.num_steps=2"], tmp_path)
    assert code == exit_codes.ENVIRONMENT, log.read_text()
    assert "storage error (NotADirectoryError)" in last and str(blocker) in last
    assert "Traceback" not in log.read_text()  # an expected failure: one line, no traceback


def test_unexpected_error_is_1_one_line_with_the_traceback_above(tmp_path: Path) -> None:
    code = ("import sys, largessl.cli as cli; cli.COMMANDS['boom'] = ('boom_command', 'a command with a bug'); "
            "sys.exit(cli.main())")
    env = dict(os.environ, PYTHONPATH=f"{cli_runs.ROOT}{os.pathsep}{cli_runs.ROOT / 'tests'}")
    res = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == exit_codes.UNEXPECTED, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback (most recent call last)" in res.stderr and "boom_command.py" in res.stderr
    assert "unexpected error (a bug; the traceback is above): IndexError: list index out of range" in lines[-1]


def test_group_sigterm_with_loader_workers_saves_and_exits_75(tmp_path: Path, digits: str) -> None:
    """SLURM/torchrun/``kill -- -PGID`` signal every process, loader workers included: still a clean stop."""
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=2",
            "checkpoint.every_steps=1000"]
    (proc,) = cli_runs.start([*args, "train.num_steps=400"], logs, new_session=True)
    cli_runs.wait_for_step(run, 3, [proc])
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group: trainer and both workers
    assert cli_runs.wait([proc]) == [exit_codes.REQUEUE], cli_runs.logs(logs)
    text = cli_runs.logs(logs)
    assert "received SIGTERM" in text and "killed by signal" not in text
    last = max(cli_runs.steps(run))
    ckpt = find_latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.endswith(f"step-{last:08d}")
    verify_checkpoint(ckpt)
    # the same command continues from there
    (proc,) = cli_runs.start([*args, "--allow-change=train.num_steps", f"train.num_steps={last + 2}"], logs)
    assert cli_runs.wait([proc]) == [exit_codes.OK], cli_runs.logs(logs)
    assert cli_runs.steps(run)[-2:] == [last + 1, last + 2]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1200 KiB tmpfs: room for one checkpoint of the SMALL run (about 830 KiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"the full-disk test mounts a small tmpfs, which this machine does not allow "
                    f"(needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write zeros into ``path`` until the volume is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError:
            pass


def test_full_disk_is_3_names_the_path_and_a_rerun_cleans_up_first(tmp_path: Path, digits: str,
                                                                   small_disk: Path) -> None:
    run = small_disk / "run"
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "train.num_steps=4",
            "checkpoint.every_steps=2", "data.num_workers=0"]
    code, last, log = _run(args, tmp_path)
    assert code == exit_codes.ENVIRONMENT, log.read_text()
    assert "ERROR largessl: disk full (no space left on device)" in last, last
    assert f"{run}/checkpoints/" in last  # the path that could not be written
    # the failed save removed its partial files; the previous checkpoint is intact and still the latest
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob(".tmp-*"))
    assert find_latest_checkpoint(ckpts).endswith("step-00000002")
    verify_checkpoint(ckpts / "step-00000002")

    # A save killed mid-write (SIGKILL, node loss) cannot clean up: its staging folder fills the disk.
    staging = ckpts / ".tmp-step-00000004"
    staging.mkdir()
    _fill(staging / "model.safetensors")
    config_before = (run / "config.yaml").read_text()
    code, last, log = _run(args, tmp_path)  # the same command, on the still-full disk
    text = log.read_text()
    assert f"removed interrupted save {staging}" in text
    assert text.index("removed interrupted save") < text.index("resumed from")  # cleaned up before writing
    assert f"resumed from {ckpts}/step-00000002 at step 2" in text
    assert code == exit_codes.ENVIRONMENT and "disk full" in last  # two checkpoints still do not fit
    assert (run / "config.yaml").read_text() == config_before
    assert not list(run.glob(".config.yaml.tmp-*")) and not list(ckpts.glob(".tmp-*"))

    # Someone else's file fills the disk: config.yaml cannot be written; the message names it, nothing is left.
    _fill(small_disk / "other-data.bin")
    code, last, log = _run(args, tmp_path)  # the same run: it resumes at step 2, then writes config.yaml first
    assert code == exit_codes.ENVIRONMENT, log.read_text()
    assert "disk full (no space left on device)" in last and f"{run}/config.yaml" in last
    assert (run / "config.yaml").read_text() == config_before  # the atomic write left the old one intact
    assert not list(run.glob(".config.yaml.tmp-*"))
    assert json.loads((ckpts / "step-00000002" / "COMPLETE.json").read_text())["step"] == 2
