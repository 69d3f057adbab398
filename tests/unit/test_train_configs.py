"""Every shipped config loads strictly and plans a run; the demo config file matches the embedded recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from largessl.config import load_config, plan_run

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_plans(path):
    cfg = load_config(path)
    plan = plan_run(cfg, world_size=8 if cfg.train.global_batch_size >= 256 else 1, num_train_samples=1_281_167)
    assert plan.num_steps > 0 and plan.lr > 0


def test_paper_hyperparameters():
    bt = load_config([p for p in CONFIGS if p.stem == "barlow_twins_r50_in1k"][0])
    plan = plan_run(bt, 8, 1_281_167)
    assert plan.lr == pytest.approx(0.2 * 2048 / 256) and plan.bias_norm_lr == pytest.approx(0.0048 * 8)
    assert bt.method.lambd == 0.005 and bt.optim.final_lr_ratio == 0.001 and bt.optim.weight_decay == 1.5e-6
    vic = load_config([p for p in CONFIGS if p.stem == "vicreg_r50_in1k"][0])
    assert (vic.method.sim_coeff, vic.method.std_coeff, vic.method.cov_coeff) == (25.0, 25.0, 1.0)


def test_demo_file_matches_embedded_recipe():
    from largessl.demo import DEMO_OVERRIDES

    embedded = load_config(None, DEMO_OVERRIDES)
    from_file = load_config([p for p in CONFIGS if p.stem == "demo_digits"][0], ["train.num_steps=0",
                                                                                  "train.epochs=100"])
    embedded.train.num_steps = 0
    from_file.eval.online_probe = embedded.eval.online_probe
    assert from_file == embedded


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("_r50_in1k")],
                         ids=[p.stem for p in CONFIGS if p.stem.endswith("_r50_in1k")])
def test_paper_recipes_use_global_backbone_bn(path):
    """The reference code of every paper converts the whole model to SyncBatchNorm; so do our recipes."""
    assert load_config(path).model.sync_bn is True
