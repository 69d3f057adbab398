"""Nothing that unpickles leaves the hub: .pt files become safetensors + JSON, or are refused by name.

Round trips are checked value by value against ``torch.load(weights_only=True)`` of the original, on a
hand-made object with every kind of value a training state holds and on the real files of a DeepSpeed
ZeRO-2 checkpoint. A pickle that names any other class is refused without being unpickled.
"""

from __future__ import annotations

import collections
import enum
import json
import math
import os
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir

from largessl.hub import Hub, load_backbone
from largessl.hub.export import push_run
from largessl.hub.pickle_free import (
    DEEPSPEED_GLOBALS,
    PickleRefused,
    convert_pt_file,
    is_pickle_bytes,
    is_pickle_file,
    load_pickle_free,
    load_pt_weights_only,
)
from largessl.hub.records import BACKBONE, CARD, INDEX


def same(a, b) -> bool:
    """Deep equality: tensors by dtype/shape/values (and Parameter-ness), NaN equal to NaN, types exact."""
    if isinstance(a, torch.Tensor):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                and a.requires_grad == b.requires_grad)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, enum.Enum):
        return same(vars(a), vars(b))
    return a == b


def _rich_state() -> dict:
    torch.manual_seed(0)
    flat = torch.randn(20)
    return {
        "model": collections.OrderedDict([("w", torch.randn(3, 4)), ("b", torch.zeros(0)),
                                          ("bn.num_batches_tracked", torch.tensor(7))]),
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3, 4)}, 1: {"step": torch.tensor(3.0)}},
                      "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.999), "nesterov": False}]},
        "views": [flat[:10], flat[5:], flat.view(4, 5)],  # share storage: come back as separate tensors
        "param": torch.nn.Parameter(torch.ones(2)),
        "bf16": torch.randn(5).to(torch.bfloat16), "mask": torch.tensor([True, False]),
        "floats": [float("nan"), float("inf"), -float("inf"), 1.5], "big": 2**70, "none": None,
        "bytes": b"\x00\x80\xff", "size": torch.Size([2, 3]), "dtype": torch.float16, "set": {1, 2},
        "tuple_keys": {(1, "a"): "x"}, "__dunder": 1,
    }


def test_round_trip_of_every_kind_of_value(tmp_path):
    obj = _rich_state()
    torch.save(obj, tmp_path / "state.pt")
    expected = torch.load(tmp_path / "state.pt", weights_only=True)
    tensors, doc = convert_pt_file(tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists() and not is_pickle_file(tensors) and not is_pickle_file(doc)
    assert json.loads(doc.read_text())["format"] == "largessl-pickle-free/1"
    back = load_pickle_free(doc)
    assert same(back, expected)
    assert same(back["views"], [t.clone() for t in obj["views"]]) and back["views"][0].data_ptr() != back["views"][1].data_ptr()
    assert not same(back, {**expected, "big": 1})  # the comparison can fail
    # a tensors file that no longer matches its JSON is refused
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_pickle_free(doc)


class _Payload:
    """Unpickling this would create a file: the refusal must happen before any of it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_other_classes_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weights": torch.ones(2), "payload": _Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(PickleRefused, match=r"bad.pt needs .*pathlib.Path.*--full-checkpoint"):
        convert_pt_file(tmp_path / "bad.pt")
    assert not marker.exists()
    assert (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.json").exists()
    assert not (tmp_path / "bad.safetensors").exists()


def test_pickle_detection(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "zip.bin2")
    (tmp_path / "raw2").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    (tmp_path / "raw5").write_bytes(pickle.dumps({"a": 1}, protocol=5))
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp_path / "c.json").write_text("{}")
    assert is_pickle_file(tmp_path / "zip.bin2") and is_pickle_file(tmp_path / "raw2") and is_pickle_file(tmp_path / "raw5")
    assert not is_pickle_file(tmp_path / "w.safetensors") and not is_pickle_file(tmp_path / "c.json")
    assert is_pickle_bytes((tmp_path / "zip.bin2").read_bytes()) and is_pickle_bytes(b"", "x/training.pt")
    assert not is_pickle_bytes((tmp_path / "w.safetensors").read_bytes(), "w.safetensors")


def test_push_refuses_pickles_and_a_bad_full_checkpoint(tmp_path):
    run = make_run_dir(tmp_path / "run", arch="repro_convnet", small_input=False)
    hub_dir = tmp_path / "hub"
    torch.save({"a": torch.ones(1)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="refusing to publish extra.pt: it is a pickle"):
        Hub(str(hub_dir)).push("m", "v1", {"extra.pt": str(tmp_path / "weights.pt")}, {})
    # a training.pt holding an arbitrary object cannot be converted: the push stops before uploading
    ckpt = next((run / "checkpoints").glob("step-*"))
    marker = tmp_path / "ran"
    torch.save({"step": 1, "payload": _Payload(marker)}, ckpt / "training.pt")
    with pytest.raises(ValueError, match="cannot publish training.pt without pickle"):
        # the checkpoint's own hash check would catch the edit first; refresh the marker like a real save would
        from largessl.run.checkpoint import MARKER, _sha256_file

        m = json.loads((ckpt / MARKER).read_text())
        m["files"]["training.pt"] = _sha256_file(ckpt / "training.pt")
        m["sizes"]["training.pt"] = (ckpt / "training.pt").stat().st_size
        (ckpt / MARKER).write_text(json.dumps(m))
        push_run(run, str(hub_dir), name="m", version="v1", include_full_checkpoint=True)
    assert not marker.exists()
    assert not (hub_dir / INDEX).exists() and not (hub_dir / "models").exists()


def test_pull_never_writes_a_pickle_from_an_old_hub(tmp_path):
    """A format-1 hub (older largessl) whose full checkpoint holds a .pt: refused, or pulled without it."""
    run = make_run_dir(tmp_path / "run", arch="repro_convnet", small_input=False)
    hub_dir = tmp_path / "hub"
    push_run(run, str(hub_dir), name="m", version="v1")
    folder = hub_dir / "models/m/v1"
    torch.save({"step": 1}, folder / "training.pt")
    card = json.loads((folder / CARD).read_text())
    from largessl.hub.store import _json_bytes, sha256_bytes, sha256_file

    card["files"]["checkpoint/training.pt"] = {"sha256": sha256_file(folder / "training.pt"),
                                               "size": (folder / "training.pt").stat().st_size}
    (folder / "checkpoint").mkdir()
    (folder / "training.pt").rename(folder / "checkpoint/training.pt")
    raw = _json_bytes(card)
    (folder / CARD).write_bytes(raw)
    index = json.loads((hub_dir / INDEX).read_text())
    index["format"] = "largessl-hub-index/1"
    entry = index["models"]["m"]["versions"]["v1"]
    index["models"]["m"]["versions"]["v1"] = {"created": entry["created"], "card_sha256": sha256_bytes(raw),
                                              "summary": entry["summary"]}
    (hub_dir / INDEX).write_text(json.dumps(index))
    hub = Hub(str(hub_dir))
    with pytest.raises(ValueError, match=r"pickled files \(checkpoint/training.pt\).*--skip-pickles"):
        hub.pull("m@v1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    dest = hub.pull("m@v1", tmp_path / "dest", skip_pickles=True)
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == [BACKBONE, CARD]
    assert load_backbone(dest).num_features == 128


def test_deepspeed_zero2_checkpoint_is_converted(tmp_path, capsys):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    from hub_runs import make_deepspeed_run_dir

    from largessl.cli import main
    from largessl.run.checkpoint import find_latest_checkpoint

    run = make_deepspeed_run_dir(tmp_path / "run")
    ckpt = Path(find_latest_checkpoint(run / "checkpoints"))
    originals = sorted(p.relative_to(ckpt).as_posix() for p in (ckpt / "deepspeed").rglob("*.pt"))
    assert any("optim_states" in p for p in originals) and any("model_states" in p for p in originals)
    hub_dir = tmp_path / "hub"
    assert main(["hub", "push", str(run), "--hub", str(hub_dir), "--name", "ds", "--version", "v1",
                 "--full-checkpoint"]) == 0
    assert main(["hub", "pull", "ds@v1", str(tmp_path / "dest"), "--hub", str(hub_dir)]) == 0
    dest = tmp_path / "dest"
    pulled = [p for p in dest.rglob("*") if p.is_file()]
    assert not [p for p in pulled if is_pickle_file(p) or p.suffix == ".py"], pulled
    marker = json.loads((dest / "checkpoint/COMPLETE.json").read_text())
    assert set(marker["pickle_free"]["converted"]) == {*originals, "training.pt", "rank-00000.pt"}
    assert all(k.endswith(".py") for k in marker["pickle_free"]["omitted"])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from largessl.hub.pickle_free import _allowed_class

    for rel in originals:
        expected = load_pt_weights_only(ckpt / rel)  # weights_only + DeepSpeed's plain classes
        back = load_pickle_free(dest / "checkpoint" / rel.replace(".pt", ".json"))
        assert same(back, expected), rel
    optim = load_pickle_free(next((dest / "checkpoint/deepspeed").rglob("*optim_states.json")))
    scaler_cls = _allowed_class(DEEPSPEED_GLOBALS[0])
    assert isinstance(optim["optimizer_state_dict"]["loss_scaler"], scaler_cls)
    card = json.loads((dest / CARD).read_text())
    assert card["data_skips"] == {"skipped_samples": 3} and card["git_revision"] == "feedface"
