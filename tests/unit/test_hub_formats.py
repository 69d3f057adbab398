"""``hub export``: timm, Hugging Face, torchvision and detectron2 folders, loaded by the real libraries.

Every export is compared with ``largessl.hub.load_backbone`` on the same images (fp32, within 1e-5).
timm and huggingface_hub are the real packages (the ``test`` extra); the network is blocked during the
loads, so a library that tried to download would fail the test. detectron2 does not install here: its
export is checked for detectron2's key layout, for holding nothing but arrays and plain values, and for
giving back the same weights and features.
"""

from __future__ import annotations

import io
import json
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hub_runs import make_run_dir
from safetensors.torch import load_file

from largessl.hub import Hub, load_backbone
from largessl.hub.export import push_run
from largessl.hub.formats import FORMATS, detectron2_key, export_model

timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e '.[test]'")
huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub comes with timm (test extra)")


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    """A local hub with a resnet18 (ImageNet stem, 64 px) and a small-input resnet18."""
    base = tmp_path_factory.mktemp("formats")
    hub = base / "hub"
    run = make_run_dir(base / "run", small_input=False, overrides=["data.image_size=64"], seed=3)
    push_run(run, str(hub), name="r18", version="v1", license="apache-2.0")
    small = make_run_dir(base / "small", seed=4)
    push_run(small, str(hub), name="r18-small", version="v1")
    return hub


@pytest.fixture
def no_network(monkeypatch):
    """Any outbound connection attempt fails the test (timm/huggingface_hub must stay offline)."""
    def refuse(self, address, *a, **k):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, size, size, generator=g)


def _reference(hub_dir: Path, ref: str = "r18@v1", size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return load_backbone(ref, hub=str(hub_dir))(_images(size))


def test_timm_export_loads_with_timm_both_ways(hub_dir, tmp_path, no_network):
    out = export_model("r18@v1", tmp_path / "timm", "timm", hub=str(hub_dir))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64] and cfg["pretrained_cfg"]["license"] == "apache-2.0"
    ref = _reference(hub_dir)
    with torch.no_grad():
        net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert net.num_classes == 0
        torch.testing.assert_close(net(_images()), ref, rtol=0, atol=1e-5)
        # the form from the issue: a named architecture with the file as pretrained_cfg overlay
        net2 = timm.create_model("resnet18", pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        torch.testing.assert_close(net2(_images()), ref, rtol=0, atol=1e-5)
    data_cfg = timm.data.resolve_data_config({}, model=net)
    assert tuple(data_cfg["input_size"]) == (3, 64, 64) and tuple(data_cfg["mean"]) == (0.485, 0.456, 0.406)


def test_hf_export_is_an_upload_ready_model_repo(hub_dir, tmp_path, no_network):
    from huggingface_hub import CommitOperationAdd, ModelCard
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    out = export_model("r18@v1", tmp_path / "hf", "hf", hub=str(hub_dir))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors"]
    # exactly what upload_folder would send (its default ignore patterns drop nothing of ours)
    assert sorted(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) == files
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(out / f)) for f in files]
    assert all(op.upload_info.size > 0 for op in ops)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert "image-feature-extraction" in card.data.tags and "barlow_twins" in card.data.tags
    assert "r18@v1" in card.text and "timm.create_model" in card.text
    # the repo folder is what `timm.create_model("hf-hub:ORG/NAME")` reads after the upload
    with torch.no_grad():
        net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(net(_images()), _reference(hub_dir), rtol=0, atol=1e-5)


def test_torchvision_export_loads_into_plain_torchvision(hub_dir, tmp_path):
    for ref, small in (("r18@v1", False), ("r18-small@v1", True)):
        out = export_model(ref, tmp_path / ref.replace("@", "-"), "torchvision", hub=str(hub_dir))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["arch"] == "resnet18" and cfg["small_input"] is small
        net = torchvision.models.resnet18()
        if small:
            net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = torch.nn.Identity()
        net.fc = torch.nn.Identity()
        net.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        size = 32 if small else 64
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(_images(size)), _reference(hub_dir, ref, size), rtol=0, atol=1e-5)
        assert "torchvision.models.resnet18()" in (out / "README.md").read_text()


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays built from bytes and plain values only; any other global is an error."""

    ALLOWED = {("numpy", "ndarray"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def _from_detectron2(model: dict[str, np.ndarray], net: torch.nn.Module) -> None:
    """Load detectron2-named arrays back into a torchvision ResNet, by detectron2's naming rules."""
    d2_to_tv = {detectron2_key(k): k for k in net.state_dict()}
    state = {d2_to_tv[k]: torch.from_numpy(v) for k, v in model.items()}
    missing = net.load_state_dict(state, strict=False)
    assert missing.unexpected_keys == [] and all(k.endswith("num_batches_tracked") for k in missing.missing_keys)


def test_detectron2_export_layout_and_round_trip(hub_dir, tmp_path):
    out = export_model("r18@v1", tmp_path / "d2", "detectron2", hub=str(hub_dir))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "model.pkl"]
    obj = _ArraysOnly(io.BytesIO((out / "model.pkl").read_bytes())).load()
    assert obj["__author__"] == "largessl" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert all(isinstance(v, np.ndarray) and v.flags.writeable for v in model.values())
    # detectron2's ResNet names (as its tools/convert-torchvision-to-d2.py produces them)
    for key in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias", "stem.conv1.norm.running_mean",
                "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.0.conv1.norm.weight",
                "res2.1.conv2.norm.running_var", "res3.0.shortcut.weight", "res3.0.shortcut.norm.weight",
                "res5.1.conv2.weight"):
        assert key in model, key
    assert not any(k.startswith(("layer", "bn", "conv1.")) or "downsample" in k or "num_batches" in k for k in model)
    ref_state = load_backbone("r18@v1", hub=str(hub_dir)).state_dict()
    assert len(model) == sum(1 for k in ref_state if not k.endswith("num_batches_tracked"))
    assert model["res3.0.shortcut.norm.running_mean"].tolist() == ref_state["layer2.0.downsample.1.running_mean"].tolist()
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    _from_detectron2(model, net)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(_images()), _reference(hub_dir), rtol=0, atol=1e-5)
    cfg = (out / "config.yaml").read_text()
    assert "DEPTH: 18" in cfg and "RES2_OUT_CHANNELS: 64" in cfg and "STRIDE_IN_1X1: False" in cfg
    assert "FORMAT: RGB" in cfg and str(out / "model.pkl") in cfg


def test_detectron2_key_mapping_for_bottlenecks():
    assert detectron2_key("conv1.weight") == "stem.conv1.weight"
    assert detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_key("layer1.0.conv3.weight") == "res2.0.conv3.weight"
    assert detectron2_key("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert detectron2_key("layer4.2.downsample.0.weight") == "res5.2.shortcut.weight"
    assert detectron2_key("layer4.0.downsample.1.running_mean") == "res5.0.shortcut.norm.running_mean"
    # every resnet50 name maps to a distinct detectron2 name
    keys = torchvision.models.resnet50().state_dict().keys()
    assert len({detectron2_key(k) for k in keys}) == len(keys)


def test_export_refusals_write_nothing(hub_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'onnx'.*timm, hf"):
        export_model("r18@v1", tmp_path / "x", "onnx", hub=str(hub_dir))
    for fmt in ("timm", "hf", "detectron2"):
        with pytest.raises(ValueError, match="small-input stem.*--format torchvision"):
            export_model("r18-small@v1", tmp_path / "x", fmt, hub=str(hub_dir))
    with pytest.raises(ValueError, match="no version 'v7'"):
        export_model("r18@v7", tmp_path / "x", "timm", hub=str(hub_dir))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_model("r18@v1", tmp_path / "full", "timm", hub=str(hub_dir))
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temp folders left behind
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]


def test_export_from_a_pulled_folder_and_cli(hub_dir, tmp_path, capsys):
    from largessl.cli import main

    pulled = Hub(str(hub_dir)).pull("r18@v1", tmp_path / "pulled")
    out = export_model(pulled, tmp_path / "tv", "torchvision")
    exported, original = load_file(str(out / "model.safetensors")), load_file(str(pulled / "backbone.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    for fmt in FORMATS:
        assert main(["hub", "export", "r18@v1", str(tmp_path / f"cli-{fmt}"), "--format", fmt,
                     "--hub", str(hub_dir)]) == 0
        assert f"as {fmt}" in capsys.readouterr().out
    assert main(["hub", "export", "r18@v1", str(tmp_path / "bad"), "--format", "onnx", "--hub", str(hub_dir)]) == 2
    assert not (tmp_path / "bad").exists()


def test_timm_backbone_without_img_size_exports_and_loads_in_timm(tmp_path, no_network):
    """A timm ConvNeXt (no img_size argument): model_args without img_size, same features; ResNet formats refuse."""
    run = make_run_dir(tmp_path / "run", arch="timm/convnext_atto", small_input=False, seed=5,
                       overrides=["data.image_size=32"])
    push_run(run, str(tmp_path / "hub"), name="cnx", version="v1")
    out = export_model("cnx@v1", tmp_path / "timm", "timm", hub=str(tmp_path / "hub"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "convnext_atto" and cfg["model_args"] == {"num_classes": 0}
    x = _images(32)
    with torch.no_grad():
        ref = load_backbone("cnx@v1", hub=str(tmp_path / "hub"))(x)
        net = timm.create_model("convnext_atto", pretrained=False, **cfg["model_args"]).eval()
        net.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-5)
    for fmt in ("torchvision", "detectron2"):
        with pytest.raises(ValueError, match="is a timm model; export it --format timm"):
            export_model("cnx@v1", tmp_path / fmt, fmt, hub=str(tmp_path / "hub"))
    assert not (tmp_path / "torchvision").exists()
