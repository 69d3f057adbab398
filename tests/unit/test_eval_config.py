"""Evaluation/hub config checks and the stage command lines the launchers turn into dependent jobs."""

from __future__ import annotations

import pytest

from largessl.config import load_config
from largessl.stages import run_stages, stage_commands


def test_eval_and_hub_config_validation():
    cfg = load_config(None, ["eval.cache_features=true", "eval.linear_lr_sweep=[0.1, 1]"])
    assert cfg.eval.linear_lr_sweep == [0.1, 1.0]
    with pytest.raises(ValueError, match="linear_lr_sweep needs eval.cache_features=true"):
        load_config(None, ["eval.linear_lr_sweep=[0.1]"])
    with pytest.raises(ValueError, match="linear_epochs"):
        load_config(None, ["eval.linear_epochs=0"])
    with pytest.raises(ValueError, match="hub.version 'latest' is not allowed"):
        load_config(None, ["hub.version=latest"])
    with pytest.raises(ValueError, match="hub.name '../x' is not allowed"):
        load_config(None, ["hub.name=../x"])


def test_stage_commands_follow_the_configured_order(tmp_path):
    cfg = load_config(None, ["stages=[knn, linear, push]", "data.train_manifest=s3://b/train/manifest.json",
                             "data.val_manifest=s3://b/val/manifest.json", "hub.url=s3://models/hub",
                             "hub.name=bt-r50", "hub.include_full_checkpoint=true",
                             "hub.endpoint_url=http://127.0.0.1:8333"])
    cmds = stage_commands(cfg, tmp_path, executable=["largessl"])
    assert cmds[0] == ["largessl", "eval", "knn", "--checkpoint", str(tmp_path), "--out", str(tmp_path),
                       "--train", "s3://b/train/manifest.json", "--val", "s3://b/val/manifest.json"]
    assert cmds[1][:3] == ["largessl", "eval", "linear"]
    assert cmds[2] == ["largessl", "hub", "push", str(tmp_path), "--hub", "s3://models/hub", "--endpoint-url",
                       "http://127.0.0.1:8333", "--name", "bt-r50", "--full-checkpoint"]
    # checkpoints on object storage: the stages read them from there
    cfg.checkpoint.dir = "s3://ckpt/run1"
    assert all("s3://ckpt/run1" in c for c in stage_commands(cfg, tmp_path))
    cfg.stages = []
    assert stage_commands(cfg, tmp_path) == [] and run_stages(cfg, tmp_path) == {}
    with pytest.raises(ValueError, match="unknown stage"):
        run_stages(cfg, tmp_path, ["segmentation"])
