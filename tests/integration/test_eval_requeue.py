"""Requeue of the evaluation stages: SIGTERM mid-epoch → checkpoint → exit 75 → the rerun resumes to the same result.

The stage command is the one the launchers run (``largessl eval <stage> --checkpoint RUN --out RUN ...``),
as a real process on the digits shards, CPU, deterministic (fixed seeds, one thread, no loader workers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir

from largessl.config import load_config
from largessl.data.digits import write_digits_shards
from largessl.models import ModelConfig, build_backbone
from largessl.run import exit_codes
from largessl.run.checkpoint import find_latest_checkpoint, load_model_state
from largessl.stages import stage_commands

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["model.arch=repro_convnet", "model.small_input=false", "data.image_size=16", "data.num_workers=0", "train.device=cpu",
          "log.tensorboard=false", "log.progress=false", "data.shuffle_buffer=256"]
EPOCHS = 2
STAGE = {
    "linear": [f"eval.linear_epochs={EPOCHS}", "eval.linear_batch_size=32", "eval.linear_lr=0.5"],
    "finetune": ["eval.finetune.percents=[50]", f"eval.finetune.epochs={EPOCHS}", "eval.finetune.batch_size=32",
                 "eval.finetune.backbone_lr=[0.05]", "eval.finetune.head_lr=[0.5]"],
}
STATE = {"linear": "linear", "finetune": "finetune_50pct"}
RESULT = {"linear": "linear.json", "finetune": "finetune_50pct.json"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, str]:
    return write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)


def _run_dir(path: Path, train: str, val: str, stage: str) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch="repro_convnet", zero_init_residual=False))
    return make_run_dir(path, backbone=backbone, overrides=[
        "model.arch=repro_convnet", f"data.train_manifest={train}", f"data.val_manifest={val}",
        f"stages=[{stage}]", *COMMON, *STAGE[stage]])


def _command(run_dir: Path, stage: str) -> list[str]:
    cfg = load_config(run_dir / "config.yaml")
    (cmd,) = stage_commands(cfg, run_dir)
    assert cmd[3:5] == ["eval", stage]
    return cmd


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "COMPLETE.json").exists())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["linear", "finetune"])
def test_stage_sigterm_mid_epoch_exits_75_and_resumes_to_the_same_result(digits, tmp_path, stage):
    train, val = digits
    straight = _run_dir(tmp_path / "straight", train, val, stage)
    stopped = _run_dir(tmp_path / "stopped", train, val, stage)

    done = subprocess.run(_command(straight, stage), env=_env(), capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((straight / "eval" / RESULT[stage]).read_text())
    state = straight / "eval" / STATE[stage]
    per_epoch = _steps(state)[-1] // EPOCHS  # a checkpoint after each epoch (the newest two are kept)

    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(stopped, stage), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    state = stopped / "eval" / STATE[stage]
    deadline = time.monotonic() + 400
    # the first epoch is reported after its checkpoint and the epoch-end stop check: epoch 2 is under way
    while f"epoch 1/{EPOCHS} train loss" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == exit_codes.REQUEUE, log_path.read_text()[-3000:]
    saved = _steps(state)[-1]
    assert per_epoch < saved < EPOCHS * per_epoch, f"stopped at step {saved}, not in the middle of epoch 2"
    assert not (stopped / "eval" / RESULT[stage]).exists()

    resumed = subprocess.run(_command(stopped, stage), env=_env(), capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {state}/step-{saved:08d}" in resumed.stderr
    result = json.loads((stopped / "eval" / RESULT[stage]).read_text())
    for key in ("top1", "top5", "val_loss", "num_val"):
        assert result[key] == reference[key], key
    # bit-identical weights at the end: the resume continued exactly where the signal stopped it
    a, _, _ = load_model_state(find_latest_checkpoint(straight / "eval" / STATE[stage]))
    b, _, _ = load_model_state(find_latest_checkpoint(state))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{stage}: stopped at step {saved} of {EPOCHS * per_epoch}, resumed to top-1 {result['top1']:.2f}% "
          f"(uninterrupted {reference['top1']:.2f}%)")


def test_a_changed_recipe_does_not_resume_a_foreign_state(digits, tmp_path):
    train, val = digits
    run_dir = _run_dir(tmp_path / "run", train, val, "linear")
    cmd = _command(run_dir, "linear")
    first = subprocess.run([*cmd, "eval.linear_epochs=1"], env=_env(), capture_output=True, text=True, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]
    other = subprocess.run([*cmd, "eval.linear_epochs=1", "eval.linear_lr=0.1"], env=_env(), capture_output=True,
                           text=True, timeout=500)
    assert other.returncode == exit_codes.BAD_INPUT and "different settings (lr)" in other.stderr
