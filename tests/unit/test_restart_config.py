"""What a restart may change (largessl.run.restart): restart-safe keys pass, experiment-defining ones are refused
naming old and new values unless allowed, fields an upgrade added are not changes, the history is deduplicated."""

from __future__ import annotations

import pytest

from largessl.config import config_to_dict, load_config
from largessl.run.restart import (
    RESTART_SAFE,
    append_history,
    check_restart,
    config_diff,
    history_record,
    matches,
    read_history,
)


def _cfg(*overrides: str) -> dict:
    return config_to_dict(load_config(None, ["train.run_dir=runs/x", *overrides]))


def test_restart_safe_changes_pass_and_are_reported() -> None:
    old = _cfg()
    new = _cfg("data.num_workers=8", "train.log_every=50", "checkpoint.every_steps=10", "train.max_minutes=30",
               "data.endpoint_url=http://s3.local", "dist.timeout_minutes=10", "stages=[knn]",
               "train.run_dir=/mnt/runs/x", "eval.linear_lr=0.3")
    decision = check_restart(old, new)
    assert not decision.allowed
    assert set(decision.safe) == {"data.num_workers", "train.log_every", "checkpoint.every_steps",
                                  "train.max_minutes", "data.endpoint_url", "dist.timeout_minutes", "stages",
                                  "train.run_dir", "eval.linear_lr"}
    assert decision.safe["data.num_workers"] == (4, 8)


@pytest.mark.parametrize("override,key", [
    ("method.name=vicreg", "method"), ("model.arch=resnet18", "model.arch"), ("optim.base_lr=0.9", "optim.base_lr"),
    ("train.num_steps=6", "train.num_steps"), ("train.global_batch_size=1024", "train.global_batch_size"),
    ("train.seed=1", "train.seed"), ("train.precision=bf16", "train.precision"),
    ("data.train_manifest=s3://b/other.json", "data.train_manifest"), ("data.augment=vicreg", "data.augment"),
])
def test_experiment_defining_changes_are_refused_with_old_and_new(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{key}[.:].* -> .*--allow-change {key}\b"):
        check_restart(_cfg(), _cfg(override), where="checkpoint runs/x/step-3")


def test_a_method_switch_names_every_changed_key_and_allow_takes_keys_or_sections() -> None:
    old, new = _cfg("train.num_steps=3"), _cfg("method.name=vicreg", "train.num_steps=6")
    with pytest.raises(ValueError) as e:
        check_restart(old, new)
    text = str(e.value)
    assert 'method.name: "barlow_twins" -> "vicreg"' in text and "train.num_steps: 3 -> 6" in text
    assert "method.lambd: 0.005 -> \"<absent>\"" not in text  # a field the new method lacks cannot act
    assert "method.sim_coeff" in text  # one VICReg has and Barlow Twins did not
    decision = check_restart(old, new, allow=["method", "train.num_steps", "optim.base_lr"])
    assert decision.allowed["method.name"] == ("barlow_twins", "vicreg")
    assert decision.allowed["train.num_steps"] == (3, 6)
    assert decision.unused_allows == ["optim.base_lr"]


def test_fields_added_by_an_upgrade_are_not_changes() -> None:
    old = _cfg()
    del old["train"]["lock_lease_seconds"]  # a checkpoint written before this field existed
    assert config_diff(old, _cfg(), defaults=_cfg()) == {}
    assert "train.lock_lease_seconds" in config_diff(old, _cfg())  # without the defaults it would look changed


def test_patterns() -> None:
    assert matches("checkpoint.every_steps", RESTART_SAFE) and matches("stages.linear.nodes", RESTART_SAFE)
    assert not matches("optim.base_lr", RESTART_SAFE) and not matches("train.num_steps", RESTART_SAFE)
    assert matches("optim.base_lr", ["optim"]) and matches("optim.base_lr", ["optim.*"])
    assert not matches("optim_x", ["optim"])


def test_history_is_appended_once_per_change(tmp_path) -> None:
    decision = check_restart(_cfg("optim.base_lr=0.2"), _cfg("optim.base_lr=0.3"), allow=["optim.base_lr"])
    rec = history_record(decision, 3, "runs/x/checkpoints/step-00000003", ["optim.base_lr"])
    assert append_history(tmp_path, rec) and not append_history(tmp_path, dict(rec, time="later"))
    assert [r["changed"] for r in read_history(tmp_path)] == [{"optim.base_lr": [0.2, 0.3]}]
