"""Downstream stages on the digits shards: linear → knn → finetune → push in-process, failure isolation,
re-run alone, and a stage stopped by a signal recorded as interrupted (exit 75) and resumed by the rerun."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hub_runs import make_run_dir

from largessl.cli import main
from largessl.config import load_config
from largessl.data.digits import write_digits_shards
from largessl.hub import Hub
from largessl.run import exit_codes
from largessl.run.checkpoint import find_latest_checkpoint
from largessl.stages import run_stages, stage_commands, stages_exit_code

EVAL = ["data.image_size=16", "data.num_workers=0", "train.device=cpu", "log.tensorboard=true",
        "eval.cache_features=true", "eval.linear_epochs=3", "eval.linear_batch_size=64",
        "eval.linear_lr_sweep=[0.5]", "eval.feature_batch_size=256", "eval.knn_k=[5, 20]"]
FINETUNE = ["eval.finetune.percents=[10]", "eval.finetune.epochs=1", "eval.finetune.batch_size=64"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, str]:
    return write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stages_run_in_order_and_leave_the_checkpoint_alone(digits, tmp_path):
    train, val = digits
    hub = tmp_path / "hub"
    overrides = [f"data.train_manifest={train}", f"data.val_manifest={val}", f"hub.url={hub}",
                 "hub.name=bt-digits", "hub.version=v1", "stages=[linear, knn, finetune, push]", *EVAL, *FINETUNE]
    run_dir = make_run_dir(tmp_path / "run", overrides=overrides)
    cfg = load_config(run_dir / "config.yaml")
    before = _tree(run_dir / "checkpoints")

    results = run_stages(cfg, run_dir)
    assert list(results) == ["linear", "knn", "finetune", "push"] and stages_exit_code(results) == 0
    linear = json.loads((run_dir / "eval" / "linear.json").read_text())
    knn = json.loads((run_dir / "eval" / "knn.json").read_text())
    finetune = json.loads((run_dir / "eval" / "finetune_10pct.json").read_text())
    assert linear["protocol"] == "cached_features" and [r["lr"] for r in linear["sweep"]] == [0.02, 0.5]
    assert linear["num_train"] == 1438 and linear["num_val"] == 359 and 0 <= linear["top1"] <= linear["top5"]
    assert set(knn["top1"]) == {"5", "20"} and knn["num_val"] == 359
    assert finetune["protocol"] == "finetune" and finetune["label_percent"] == 10.0 and finetune["num_val"] == 359
    assert finetune["num_train"] == 143 and 0 <= finetune["top1"] <= finetune["top5"]
    # the per-rank feature cache is written once and reused by knn
    assert len(list((run_dir / "eval" / "features").glob("*/rank-00000-of-00001.safetensors"))) == 2
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    status = json.loads((run_dir / "eval" / "stages.json").read_text())
    assert status["stages"] == {"linear": "ok", "knn": "ok", "finetune": "ok", "push": "ok"}
    card = Hub(str(hub)).show("bt-digits@v1")
    assert card["metrics"]["linear_top1"] == linear["top1"] and card["metrics"]["knn_top1"] == knn["top1"]
    assert _tree(run_dir / "checkpoints") == before

    # a stage that fails (the version now exists) is recorded and the checkpoint is still untouched
    with pytest.raises(ValueError, match="immutable"):
        run_stages(cfg, run_dir, ["push"])
    status = json.loads((run_dir / "eval" / "stages.json").read_text())
    assert status["stages"] == {"push": "failed"} and "immutable" in status["error"]
    assert _tree(run_dir / "checkpoints") == before


def test_failed_stage_is_rerun_alone_with_its_command(digits, tmp_path):
    train, val = digits
    hub = tmp_path / "hub"
    overrides = [f"data.train_manifest={train}", f"data.val_manifest={tmp_path / 'missing.json'}",
                 f"hub.url={hub}", "hub.name=m", "stages=[knn, push]", *EVAL]
    run_dir = make_run_dir(tmp_path / "run", overrides=overrides)
    cfg = load_config(run_dir / "config.yaml")
    ckpt = find_latest_checkpoint(run_dir / "checkpoints")
    before = _tree(run_dir / "checkpoints")
    with pytest.raises(ValueError, match="missing.json"):  # a missing manifest is bad input (exit 2)
        run_stages(cfg, run_dir)
    status = json.loads((run_dir / "eval" / "stages.json").read_text())
    assert status["stages"] == {"knn": "failed", "push": "pending"}
    assert not hub.exists()  # push never ran without the metrics it should carry
    assert _tree(run_dir / "checkpoints") == before and find_latest_checkpoint(run_dir / "checkpoints") == ckpt

    cmds = stage_commands(cfg, run_dir, executable=["largessl"])
    assert [c[:3] for c in cmds] == [["largessl", "eval", "knn"], ["largessl", "hub", "push"]]
    assert cmds[1][cmds[1].index("--hub") + 1] == str(hub) and "--name" in cmds[1]
    # the fix (a correct val manifest) goes on the re-run's command line; the stage then runs alone
    knn_cmd = cmds[0][1:]
    knn_cmd[knn_cmd.index("--val") + 1] = val
    assert main([*knn_cmd, *EVAL]) == 0
    assert json.loads((run_dir / "eval" / "knn.json").read_text())["num_val"] == 359
    assert main(cmds[1][1:]) == 0
    assert Hub(str(hub)).show("m")["metrics"]["knn_top1"]
    assert _tree(run_dir / "checkpoints") == before


def test_eval_cli_full_linear_protocol_and_random_baseline(digits, tmp_path, capsys):
    train, val = digits
    out = tmp_path / "out"
    args = ["--train", train, "--val", val, "--out", str(out), "model.arch=resnet18", "model.small_input=true",
            "data.image_size=16", "data.num_workers=0", "train.device=cpu", "log.tensorboard=false",
            "eval.linear_epochs=1", "eval.linear_batch_size=128", "eval.feature_batch_size=256", "log.progress=true"]
    assert main(["eval", "linear", "--checkpoint", "random", *args]) == 0
    res = json.loads((out / "eval" / "linear.json").read_text())
    assert res["protocol"] == "full" and res["num_val"] == 359 and res["source"]["random_init"] is True
    assert find_latest_checkpoint(out / "eval" / "linear")  # the requeue state: step-N folders, hash-verified
    err = capsys.readouterr().err
    # progress with ETA on the training epochs and the val pass: stderr is not a terminal here, so plain lines
    # (a terminal gets tqdm bars: tests/unit/test_progress.py)
    lines = [line for line in err.splitlines() if "largessl.progress" in line]
    assert any("linear: step" in line and "(100%)" in line and "eta" in line for line in lines), err[-2000:]
    assert any("linear (val): step" in line and "(100%)" in line for line in lines), err[-2000:]
    assert main(["eval", "knn", "--checkpoint", "random", *args]) == 0
    err = capsys.readouterr().err
    for desc in ("features (train)", "features (val)", "kNN"):
        assert any(f"{desc}: step" in line and "(100%)" in line for line in err.splitlines()), err[-2000:]
    assert main(["eval", "linear", "--checkpoint", "hub:nope@v1", "--hub", str(tmp_path / "h"), *args]) == 2


def test_a_stage_stopped_by_a_signal_is_recorded_and_resumed_by_the_rerun(digits, tmp_path):
    train, val = digits
    hub = tmp_path / "hub"
    overrides = [f"data.train_manifest={train}", f"data.val_manifest={val}", f"hub.url={hub}", "hub.name=m",
                 "stages=[linear, push]", "data.image_size=16", "data.num_workers=0", "train.device=cpu",
                 "log.tensorboard=false", "log.progress=false", "eval.linear_epochs=2", "eval.linear_batch_size=64"]
    run_dir = make_run_dir(tmp_path / "run", overrides=overrides)
    cfg = load_config(run_dir / "config.yaml")
    state = run_dir / "eval" / "linear"

    def signal_when_training() -> None:
        deadline = time.monotonic() + 300
        while not state.is_dir() and time.monotonic() < deadline:  # the stage's checkpoint manager exists
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM/Kubernetes would: the stage's handler records it

    sender = threading.Thread(target=signal_when_training)
    sender.start()
    results = run_stages(cfg, run_dir)
    sender.join()
    assert stages_exit_code(results) == exit_codes.REQUEUE and results["linear"]["stopped"]
    status = json.loads((run_dir / "eval" / "stages.json").read_text())
    assert status["stages"] == {"linear": "interrupted", "push": "pending"} and "rerun" in status["error"]
    assert not hub.exists() and find_latest_checkpoint(state)  # push waited; the linear state was saved
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the stage left SIG_IGN for its exit: a fresh process
    results = run_stages(cfg, run_dir)
    assert stages_exit_code(results) == 0 and results["linear"]["protocol"] == "full"
    assert json.loads((run_dir / "eval" / "stages.json").read_text())["stages"] == {"linear": "ok", "push": "ok"}
