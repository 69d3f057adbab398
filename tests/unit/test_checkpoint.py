"""Checkpoint folders: atomic layout, hash verification, corrupt-latest fallback, pruning, consumer API."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from largessl.train.checkpoint import (
    LATEST,
    MARKER,
    MODEL_FILE,
    CheckpointManager,
    SavePayload,
    capture_rng_state,
    find_latest_checkpoint,
    load_model_state,
    load_rank_state,
    load_training_checkpoint,
    restore_rng_state,
)


def _payload(step: int, model: nn.Module) -> SavePayload:
    return SavePayload(
        rank_state={"rng": capture_rng_state(), "data": {"epoch": 0, "batch_in_epoch": step, "world_size": 1}},
        model_state=model.state_dict(),
        training_state={"step": step, "epoch": 0, "optimizer": {"x": torch.tensor([float(step)])}},
        meta={"step": step, "epoch": 0, "git_revision": "abc", "config": {"train": {"seed": 3}}},
    )


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_save_layout_and_consumer_api(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(str(run / "checkpoints"), keep=2)
    m = _model(0)
    path = mgr.save(5, _payload(5, m))
    assert path.endswith("step-00000005")
    marker = json.loads((run / "checkpoints" / "step-00000005" / MARKER).read_text())
    assert set(marker["files"]) == {MODEL_FILE, "training.pt", "meta.json", "rank-00000.pt"}
    assert (run / "checkpoints" / LATEST).read_text().strip() == "step-00000005"
    assert not list((run / "checkpoints").glob(".tmp-*"))

    state, config, meta = load_model_state(run)  # a run dir resolves to its newest checkpoint
    assert set(state) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(state[k], v)
    assert config == {"train": {"seed": 3}}
    assert meta["step"] == 5 and meta["git_revision"] == "abc"
    train = load_training_checkpoint(path)
    assert train["step"] == 5 and torch.equal(train["optimizer"]["x"], torch.tensor([5.0]))
    assert load_rank_state(path, 0)["data"]["batch_in_epoch"] == 5


def test_keep_last_k(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    m = _model(0)
    for s in (1, 2, 3, 4):
        mgr.save(s, _payload(s, m))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "missing_file"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
    mgr = CheckpointManager(str(tmp_path), keep=3)
    good, bad = _model(1), _model(2)
    mgr.save(10, _payload(10, good))
    latest = mgr.save(20, _payload(20, bad))
    f = tmp_path / "step-00000020" / MODEL_FILE
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "no_marker":
        (tmp_path / "step-00000020" / MARKER).unlink()
    else:
        (tmp_path / "step-00000020" / "training.pt").unlink()
    with caplog.at_level("WARNING"):
        found = find_latest_checkpoint(tmp_path)
    assert found is not None and found.endswith("step-00000010") and found != latest
    assert "step-00000020" in caplog.text
    state, _, meta = load_model_state(tmp_path)
    assert meta["step"] == 10
    assert torch.equal(state["0.weight"], good.state_dict()["0.weight"])


def test_interrupted_save_leaves_no_valid_folder(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    mgr.save(1, _payload(1, _model(0)))
    # a save killed mid-way leaves only a staging folder, never a step folder
    (tmp_path / ".tmp-step-00000002").mkdir()
    (tmp_path / ".tmp-step-00000002" / MODEL_FILE).write_bytes(b"partial")
    assert find_latest_checkpoint(tmp_path).endswith("step-00000001")
    mgr.cleanup_interrupted()
    assert not (tmp_path / ".tmp-step-00000002").exists()


def test_no_checkpoint_is_none_and_load_raises(tmp_path):
    assert find_latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_model_state(tmp_path)


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_object_storage_marker_then_pointer():
    url = "memory://ckpt-test/run1/checkpoints"
    mgr = CheckpointManager(url, keep=2)
    m = _model(4)
    for s in (1, 2, 3):
        mgr.save(s, _payload(s, m))
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    assert fs.cat_file(f"{root}/{LATEST}").decode().strip() == "step-00000003"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "step-" in p) == [
        "step-00000002", "step-00000003"]
    assert find_latest_checkpoint(url).endswith("step-00000003")
    state, _, meta = load_model_state(url)
    assert meta["step"] == 3 and torch.equal(state["0.weight"], m.state_dict()["0.weight"])
    fs.rm(f"{root}/step-00000003/{MARKER}")
    assert find_latest_checkpoint(url).endswith("step-00000002")
    fs.rm(root, recursive=True)
