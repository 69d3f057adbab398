"""A run cannot silently change under you, through the real ``largessl pretrain`` process on the digits shards:

- resuming with another method, schedule or lr is refused (exit 2) naming each key with its old and new value,
  and nothing of the run is touched; ``--allow-change`` resumes, records the change and trains with the new value;
- a second run on a locked run directory exits 2 before it writes anything; a SIGKILLed holder's lock goes stale
  and the next run takes over and resumes;
- when no checkpoint verifies, the run refuses to start over (exit 2) unless ``--restart-from-scratch``, which keeps
  the old metrics and sets the unverifiable checkpoints aside.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import cli_runs
import pytest

from largessl.config import load_config
from largessl.run import exit_codes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(args: list[str], tmp_path: Path) -> tuple[int, str, str]:
    """(exit code, last log line, whole log) of one ``largessl pretrain`` process."""
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    before = set(logs.glob("*.log"))
    (proc,) = cli_runs.start(args, logs)
    (code,) = cli_runs.wait([proc])
    (log,) = set(logs.glob("*.log")) - before
    return code, cli_runs.last_line(log), log.read_text()


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_another_experiment_and_allow_change_records_it(tmp_path: Path, digits: str) -> None:
    run = tmp_path / "run"
    base = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=0"]
    code, last, log = _run([*base, "train.num_steps=3"], tmp_path)
    assert code == 0, log
    before = _snapshot(run)

    # the case: Barlow Twins for 3 steps, then VICReg for 6 on the same run directory
    code, last, log = _run([*base, "method.name=vicreg", "train.num_steps=6"], tmp_path)
    assert code == exit_codes.BAD_INPUT, log
    assert 'method.name: "barlow_twins" -> "vicreg"' in last and "train.num_steps: 3 -> 6" in last
    assert "--allow-change method train.num_steps" in last
    # a new lr (with the same length) is refused the same way; nothing of the run changed either time
    code, last, log = _run([*base, "optim.base_lr=0.9", "train.num_steps=3"], tmp_path)
    assert code == exit_codes.BAD_INPUT and "optim.base_lr: 0.2 -> 0.9" in last, log
    assert _snapshot(run) == before  # config.yaml, metrics.jsonl, checkpoints: untouched
    assert not (run / "config_history.jsonl").exists()

    # restart-safe keys change freely (loader workers, log cadence)
    code, _, log = _run([*base, "train.num_steps=3", "data.num_workers=1", "train.log_every=2"], tmp_path)
    assert code == 0 and "restart-safe changes" in log and "data.num_workers: 0 -> 1" in log, log

    # explicitly allowed: trained on from step 3 with the new lr and length, and recorded
    code, _, log = _run(["--allow-change", "optim.base_lr,train.num_steps", *base, "optim.base_lr=0.9",
                         "train.num_steps=6"], tmp_path)
    assert code == 0, log
    assert "experiment changed on purpose (--allow-change) from step 3" in log
    recs = _records(run)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    event = next(r for r in recs if r.get("event") == "config_change")
    assert event == {"step": 3, "event": "config_change",
                     "changes": {"optim.base_lr": {"old": 0.2, "new": 0.9}, "train.num_steps": {"old": 3, "new": 6}}}
    # metrics.jsonl shows the lr the run used: from step 4 on, the new schedule (peak 0.9 x 16/256, warm-up
    # min(6 steps, 1 epoch) = 6 steps: step 4 is its 4th), not the old one (peak 0.2 x 16/256)
    from largessl.train.schedules import warmup_cosine

    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lrs[4] == pytest.approx(0.9 * 16 / 256 * warmup_cosine(3, 6, 6, 0.001), rel=1e-9)
    assert lrs[3] == pytest.approx(0.2 * 16 / 256 * warmup_cosine(2, 3, 3, 0.001), rel=1e-9)
    saved = load_config(run / "config.yaml")
    assert saved.optim.base_lr == 0.9 and saved.train.num_steps == 6
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"optim.base_lr": [0.2, 0.9], "train.num_steps": [3, 6]}
    assert history[-1]["step"] == 3 and history[-1]["allow_change"] == ["optim.base_lr", "train.num_steps"]


def test_a_second_run_on_a_locked_run_dir_exits_2_before_writing(tmp_path: Path, digits: str) -> None:
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=1",
            "checkpoint.every_steps=2", "train.num_steps=400"]
    (first,) = cli_runs.start(args, logs)
    try:
        cli_runs.wait_for_step(run, 3, [first])
        lock = json.loads((run / "run.lock").read_text())
        assert lock["pid"] == first.pid and lock["command"] == "pretrain"
        config_before = (run / "config.yaml").stat().st_mtime_ns
        staging_seen = sorted(p.name for p in (run / "checkpoints").iterdir())
        code, last, log = _run(args, tmp_path)
        assert code == exit_codes.BAD_INPUT, log
        assert f"is in use by pid {first.pid}" in last
        assert "removed interrupted save" not in log and "run directory:" not in log  # stopped before anything
        assert (run / "config.yaml").stat().st_mtime_ns == config_before
        assert first.poll() is None  # the first run never noticed
        del staging_seen
    finally:
        first.send_signal(signal.SIGKILL)  # a node lost: no cleanup, the lock file stays
        first.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == first.pid
    saved = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    # the same command again: the holder's process is gone, so its lease is stale at once on this machine
    t0 = time.monotonic()
    code, last, log = _run([*args, "train.max_minutes=0.02"], tmp_path)  # stop (and save) soon after it resumes
    assert code == exit_codes.REQUEUE, log
    assert f"took over the lock of pid {first.pid}" in log and "its process is gone" in log
    assert f"resumed from {run}/checkpoints/step-{saved:08d}" in log
    assert time.monotonic() - t0 < 300
    assert not (run / "run.lock").exists()  # released when the run ended


def _corrupt(step_dir: Path) -> None:
    weights = step_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))


def test_no_verified_checkpoint_refuses_to_start_over_unless_told(tmp_path: Path, digits: str) -> None:
    run = tmp_path / "run"
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=0",
            "checkpoint.every_steps=2", "train.num_steps=4"]
    code, _, log = _run(args, tmp_path)
    assert code == 0, log
    for step_dir in (run / "checkpoints").glob("step-*"):
        _corrupt(step_dir)
    metrics_before = (run / "metrics.jsonl").read_text()
    code, last, log = _run(args, tmp_path)
    assert code == exit_codes.BAD_INPUT, log
    assert "none of the checkpoints" in last and "--restart-from-scratch" in last
    assert (run / "metrics.jsonl").read_text() == metrics_before  # never truncated

    code, _, log = _run(["--restart-from-scratch", *args], tmp_path)
    assert code == 0, log
    archived = list(run.glob("metrics.before-restart-*.jsonl"))
    assert len(archived) == 1 and archived[0].read_text() == metrics_before
    assert sorted(p.name for p in (run / "checkpoints").glob("unverified-step-*")) == [
        "unverified-step-00000002", "unverified-step-00000004"]
    recs = _records(run)
    assert recs[0]["event"] == "restart_from_scratch" and recs[0]["archived_metrics"] == archived[0].name
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert os.path.isdir(run / "checkpoints" / "step-00000004")
