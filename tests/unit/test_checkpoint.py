"""Checkpoint folders: atomic layout, hash verification, corrupt-latest fallback, pruning, consumer API, object
storage (fsspec memory:// and the counting filesystem), interrupted and failed saves, storage errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from largessl.run.checkpoint import (
    LATEST,
    MARKER,
    MODEL_FILE,
    CheckpointManager,
    CorruptCheckpointError,
    SavePayload,
    find_latest_checkpoint,
    load_model_state,
    load_rank_state,
    load_training_checkpoint,
    storage_error,
    verify_checkpoint,
)
from largessl.run.rng import capture_rng_state, restore_rng_state


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


def _with_parts(step: int, model: nn.Module) -> SavePayload:
    """A payload with DeepSpeed-like extra files: a shared index naming which ``part-K`` holds what."""
    payload = _payload(step, model)

    def write(folder):
        (folder / "extra").mkdir()
        (folder / "extra" / "index.json").write_text(json.dumps({"wanted": ["extra/part-1"]}))
        for k in range(3):
            (folder / "extra" / f"part-{k}").write_bytes(bytes([k, step]) * 100)

    payload.write_extra = write
    return payload


def test_more_files_are_chosen_from_the_first_ones_and_verified_with_them(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=3)
    mgr.save(10, _with_parts(10, _model(1)))
    mgr.save(20, _with_parts(20, _model(2)))
    seen = []

    def more(local, files):
        seen.append(sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()))
        assert "extra/part-2" in files  # every file the marker lists
        return json.loads((local / "extra" / "index.json").read_text())["wanted"]

    loaded = mgr.load(extra_files=lambda rel: rel == "extra/index.json", more_files=more)
    assert loaded is not None and loaded.path.endswith("step-00000020")
    assert seen == [["extra/index.json"]]  # chosen once the first files are local
    assert sorted(p.name for p in (loaded.extra_dir / "extra").iterdir()) == ["index.json", "part-1"]
    assert (loaded.extra_dir / "extra" / "part-1").read_bytes() == bytes([1, 20]) * 100
    loaded.close()
    # a corrupt file among the chosen ones fails verification like any other: the previous checkpoint loads
    f = tmp_path / "step-00000020" / "extra" / "part-1"
    f.write_bytes(bytes([9, 9]) * 100)
    loaded = mgr.load(extra_files=lambda rel: rel == "extra/index.json", more_files=more)
    assert loaded is not None and loaded.path.endswith("step-00000010")
    assert (loaded.extra_dir / "extra" / "part-1").read_bytes() == bytes([1, 10]) * 100
    loaded.close()
    # a file the marker does not list is refused, never read from outside the checkpoint
    with pytest.raises(CorruptCheckpointError, match="does not list extra/part-7"):
        mgr._read("step-00000010", json.loads((tmp_path / "step-00000010" / MARKER).read_text()), False,
                  lambda rel: False, lambda local, files: ["extra/part-7"], None)


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
        state, _, meta = load_model_state(tmp_path)
        loaded = mgr.load()
    if damage == "flip":
        # the listing checks presence and sizes only; the hash is checked as the bytes are read
        assert found == latest
        with pytest.raises(CorruptCheckpointError, match="model.safetensors is corrupt"):
            verify_checkpoint(latest)
        with pytest.raises(CorruptCheckpointError, match="corrupt"):
            load_model_state(latest)  # an explicit step folder does not fall back
    else:
        assert found is not None and found.endswith("step-00000010")
    assert "step-00000020" in caplog.text
    assert meta["step"] == 10
    assert torch.equal(state["0.weight"], good.state_dict()["0.weight"])
    assert loaded is not None and loaded.path.endswith("step-00000010") and loaded.training["step"] == 10
    assert torch.equal(loaded.model["0.weight"], good.state_dict()["0.weight"])


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
    loaded = mgr.load()
    assert loaded.path == f"{url}/step-00000003" and loaded.rank_state["data"]["batch_in_epoch"] == 3
    fs.rm(f"{root}/step-00000003/{MARKER}")
    assert find_latest_checkpoint(url).endswith("step-00000002")
    fs.rm(root, recursive=True)


class _UploadFails(RuntimeError):
    pass


def test_object_storage_failed_and_interrupted_uploads_are_cleaned(tmp_path):
    """A save that dies mid-upload leaves no valid folder and is removed; the newest good checkpoint stays
    latest; a partial folder left by a killed process is removed before the next run writes anything."""
    import fsspec

    url = "memory://ckpt-fail/checkpoints"
    fs, root = fsspec.core.url_to_fs(url)
    mgr = CheckpointManager(url, keep=2)
    m = _model(5)
    mgr.save(1, _payload(1, m))
    mgr.save(2, _payload(2, m))

    real_put = mgr.store.fs.put_file
    calls = []

    def flaky_put(lpath, rpath, **kw):  # the second upload of the save fails, as a dropped connection would
        calls.append(rpath)
        if len(calls) == 2:
            raise _UploadFails("connection reset while uploading")
        return real_put(lpath, rpath, **kw)

    mgr.store.fs.put_file = flaky_put
    with pytest.raises(_UploadFails):
        mgr.save(3, _payload(3, m))
    mgr.store.fs.put_file = real_put
    assert not fs.exists(f"{root}/step-00000003")  # the failed save removed what it had uploaded
    assert find_latest_checkpoint(url).endswith("step-00000002")

    # a killed process cannot clean up: its partial folder stays until the next start
    fs.pipe_file(f"{root}/step-00000004/{MODEL_FILE}", b"partial")
    assert find_latest_checkpoint(url).endswith("step-00000002")
    assert mgr.cleanup_interrupted() == [f"{url}/step-00000004"]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "step-" in p) == [
        "step-00000001", "step-00000002"]

    # pruning counts complete checkpoints only and never drops the one just written and checked
    fs.pipe_file(f"{root}/step-00000000/{MODEL_FILE}", b"partial")
    mgr.save(5, _payload(5, m))
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "step-" in p) == [
        "step-00000002", "step-00000005"]
    assert mgr.load().path.endswith("step-00000005")
    fs.rm(root, recursive=True)


def test_resave_of_the_same_step_on_object_storage():
    import fsspec

    url = "memory://ckpt-resave/checkpoints"
    mgr = CheckpointManager(url, keep=2)
    mgr.save(1, _payload(1, _model(1)))
    mgr.save(2, _payload(2, _model(2)))
    mgr.save(2, _payload(2, _model(3)))
    state, _, _ = load_model_state(url)
    assert torch.equal(state["0.weight"], _model(3).state_dict()["0.weight"])
    assert mgr.load().path.endswith("step-00000002")
    fsspec.core.url_to_fs(url)[0].rm("/ckpt-resave", recursive=True)


def test_reads_each_file_once_through_fsspec(tmp_path):
    """Single process: resume reads the marker and each file it loads exactly once (counting filesystem)."""
    import counting_fs

    counting_fs.register()
    url = f"counting://{tmp_path}/ckpt"
    mgr = CheckpointManager(url, keep=2)
    mgr.save(7, _payload(7, nn.Linear(300, 300)))
    counting_fs.reset()
    loaded = mgr.load()
    sizes = loaded.marker["sizes"]
    read = {p.rsplit("/", 1)[-1]: n for p, n in counting_fs.BYTES_READ.items()}
    assert set(read) == set(sizes) | {MARKER}
    assert all(read[f] == sizes[f] for f in sizes)


def test_storage_errors_name_the_path(tmp_path):
    import errno

    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x" / MODEL_FILE)
    assert full.errno == errno.ENOSPC and "disk full" in full.strerror and full.filename.endswith(MODEL_FILE)
    other = storage_error(OSError(errno.EIO, "Input/output error"), tmp_path / "y")
    assert other.filename == str(tmp_path / "y")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as info:
        CheckpointManager(str(blocker / "checkpoints"))
    assert str(blocker) in str(info.value.filename)


def test_failed_local_save_removes_its_staging(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep=2)
    mgr.save(1, _payload(1, _model(0)))
    payload = _payload(2, _model(1))

    def fail(folder):
        (folder / "deepspeed").mkdir()
        (folder / "deepspeed" / "part.pt").write_bytes(b"x" * 1000)
        raise RuntimeError("writer failed")

    payload.write_extra = fail
    with pytest.raises(RuntimeError, match="writer failed"):
        mgr.save(2, payload)
    assert not list(tmp_path.glob(".tmp-*")) and find_latest_checkpoint(tmp_path).endswith("step-00000001")


KILLED_SAVE = """
import sys, time
sys.path.insert(0, sys.argv[2])
from test_checkpoint import _model, _payload
from largessl.run.checkpoint import CheckpointManager

mgr = CheckpointManager(sys.argv[1], keep=2)
def stuck_upload(lpath, rpath, **kw):  # the object store stops answering mid-upload
    print("uploading", flush=True)
    time.sleep(600)
mgr.store.fs.put_file = stuck_upload
mgr.save(1, _payload(1, _model(0)))
"""


def test_a_killed_remote_save_leaves_no_share_in_tmpdir(tmp_path, monkeypatch):
    """A remote save writes this rank's share under TMPDIR first; when the process is SIGKILLed there, the next
    manager of the same checkpoint directory (any rank, at start) removes it. Live processes' folders stay."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    url = "memory://killed-save/checkpoints"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, url, str(root / "tests" / "unit")],
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "uploading"
    left = [p for p in tmpdir.iterdir() if p.name.startswith("largessl-save-")]
    assert len(left) == 1 and any(left[0].rglob("*.pt")), list(tmpdir.iterdir())  # its share, written
    live = CheckpointManager(url, keep=2)  # the killed process is still alive: its folder stays
    assert left[0].exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left[0].exists()  # a SIGKILL cleans nothing up
    other = tmpdir / "largessl-save-0123456789ab-r00000-p1-step-00000001-x"  # another run's: not ours
    other.mkdir()
    CheckpointManager(url, keep=2)  # the next start (every rank builds its manager) cleans up
    assert not left[0].exists() and other.exists()
    assert live.cleanup_scratch() == []
