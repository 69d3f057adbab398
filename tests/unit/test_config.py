"""Typed config: loading, precedence, strict checking, derived values."""

from __future__ import annotations

import pytest

from largessl.config import config_to_yaml, load_config, parse_override, plan_run


def test_defaults_and_override_types():
    cfg = load_config(None, ["optim.base_lr=0.3", "method.lambd=0.01", "stages=[linear, knn]"])
    assert cfg.optim.base_lr == 0.3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.method.lambd == 0.01
    assert cfg.stages == ["linear", "knn"]


def test_precedence_cli_over_file_over_base(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  base_lr: 0.5\n  weight_decay: 0.1\ntrain:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  base_lr: 0.4\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=9"])
    assert cfg.optim.base_lr == 0.4  # child over base
    assert cfg.optim.weight_decay == 0.1  # inherited from base
    assert cfg.train.epochs == 9  # command line over files


def test_unknown_key_names_file_and_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"optim\.lrr.*bad\.yaml.*base_lr"):
        load_config(f)


def test_wrong_type_and_choice():
    with pytest.raises(ValueError, match="train.global_batch_size.*integer"):
        load_config(None, ["train.global_batch_size=abc"])
    with pytest.raises(ValueError, match="optim.name.*allowed: lars, sgd, adamw"):
        load_config(None, ["optim.name=adam"])
    with pytest.raises(ValueError, match="unknown method 'nope'.*barlow_twins"):
        load_config(None, ["method.name=nope"])


def test_method_keys_follow_method_name():
    with pytest.raises(ValueError, match="method.sim_coeff"):
        load_config(None, ["method.name=barlow_twins", "method.sim_coeff=3"])


def test_impossible_combination():
    with pytest.raises(ValueError, match="checkpoint.keep"):
        load_config(None, ["checkpoint.keep=1"])
    with pytest.raises(ValueError, match="unknown stage"):
        load_config(None, ["stages=[train]"])


def test_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["optim.base_lr=0.3"])
    p = tmp_path / "config.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg


def test_plan_run_derived_values():
    cfg = load_config(None, ["train.global_batch_size=512", "train.epochs=2", "optim.warmup_epochs=1"])
    plan = plan_run(cfg, world_size=4, num_train_samples=10_000)
    assert plan.per_rank_batch_size == 128
    assert plan.steps_per_epoch == 19 and plan.num_steps == 38 and plan.warmup_steps == 19
    assert plan.lr == pytest.approx(0.2 * 2)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        plan_run(cfg, world_size=3, num_train_samples=10_000)
    with pytest.raises(ValueError, match="fewer than train.global_batch_size"):
        plan_run(cfg, world_size=4, num_train_samples=100)


def test_parse_override_errors():
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("optim.base_lr")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads "1e-9" as a string; the loader treats it as the float users mean.
    cfg = load_config(None, ["method.name=decorrelation", "method.dbn_eps=1e-9", "optim.weight_decay=2E-4"])
    assert cfg.method.dbn_eps == 1e-9 and cfg.optim.weight_decay == 2e-4
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 1e-6\n")
    assert load_config(f).optim.weight_decay == 1e-6
