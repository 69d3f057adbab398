"""A tiny timm ViT end to end on CPU: pretrain on the digits shards, push to a hub, pull (sha256-verified),
export ``--format timm`` and load that folder in the real timm, with features equal to largessl's within 1e-5.

Every step is the real CLI (``python -m largessl ...``) in a subprocess with this checkout on PYTHONPATH; the
timm loads run with the network blocked, so a library that tried to download would fail the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from largessl.data.digits import write_digits_shards
from largessl.hub import load_backbone

timm = pytest.importorskip("timm", reason="timm is a largessl dependency: pip install -c constraints.txt timm")

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "largessl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"largessl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def no_network(monkeypatch):
    """Any outbound connection attempt fails the test."""
    def refuse(self, address, *a, **k):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_vit_pretrain_push_pull_export_loads_in_timm(tmp_path, no_network):
    train_url, _ = write_digits_shards(str(tmp_path / "digits"))
    run, hub = tmp_path / "run", tmp_path / "hub"
    _cli("pretrain", "--config", "configs/vit_tiny_cpu.yaml", f"data.train_manifest={train_url}",
         f"train.run_dir={run}", "train.num_steps=6", "checkpoint.every_steps=3", "log.progress=false",
         "log.tensorboard=false", "data.num_workers=0")
    _cli("hub", "push", str(run), "--hub", str(hub), "--name", "bt-vit-tiny", "--version", "v1")
    _cli("hub", "pull", "bt-vit-tiny@v1", str(tmp_path / "pulled"), "--hub", str(hub))
    card = json.loads((tmp_path / "pulled" / "model_card.json").read_text())
    arch = card["architecture"]
    assert arch["arch"] == "timm/vit_tiny_patch16_224" and arch["num_features"] == 96 and arch["image_size"] == 32
    assert arch["timm_kwargs"] == {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
    out = tmp_path / "timm"
    _cli("hub", "export", "bt-vit-tiny@v1", str(out), "--format", "timm", "--hub", str(hub))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224"
    assert cfg["model_args"] == {"num_classes": 0, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3,
                                 "img_size": 32}

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_backbone("bt-vit-tiny@v1", hub=str(hub))(images)
        # the plain form: the named model with the config's arguments, then the safetensors file
        net = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
        net.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        plain = net(images)
        # timm's own loader of an exported folder
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images)
    diff = max((plain - ours).abs().max().item(), (local - ours).abs().max().item())
    print(f"timm export of a pretrained tiny ViT: max |features(timm) - features(largessl)| = {diff:.3e}")
    assert ours.shape == (8, 96) and ours.abs().max() > 0
    assert diff < 1e-5
    # the weights really are the trained ones: a fresh random init of the same model differs
    torch.manual_seed(123)
    fresh = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    with torch.no_grad():
        assert (fresh(images) - ours).abs().max() > 1e-2


@pytest.mark.slow  # compile, pretraining and three evaluation stages: ~35 s alone on 2 cores
def test_tiny_vit_compiled_bf16_collapse_metrics_online_probe_and_stages(tmp_path):
    """torch.compile + bf16 autocast on CPU (the GPU path's CPU twin), then every evaluation stage."""
    train_url, val_url = write_digits_shards(str(tmp_path / "digits"))
    run = tmp_path / "run"
    _cli("pretrain", "--config", "configs/vit_tiny_cpu.yaml", f"data.train_manifest={train_url}",
         f"data.val_manifest={val_url}", f"train.run_dir={run}", "train.num_steps=6", "train.collapse_every=3",
         "eval.online_probe=true", "stages=[knn,linear,finetune]", "eval.linear_epochs=1", "eval.finetune.epochs=1",
         "eval.finetune.batch_size=16", "eval.finetune.percents=[50]", "eval.finetune.layer_decay=0.75",
         "eval.feature_batch_size=64", "log.progress=false", "log.tensorboard=false", "data.num_workers=0",
         "train.compile=true", "train.precision=bf16")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    collapse = [r for r in recs if "collapse/rankme" in r]
    assert [r["step"] for r in collapse] == [3, 6] and all(r["collapse/rankme"] > 1 for r in collapse)
    assert all("online_probe_top1" in r for r in recs if r["step"] > 1)
    knn = json.loads((run / "eval" / "knn.json").read_text())
    linear = json.loads((run / "eval" / "linear.json").read_text())
    finetune = json.loads((run / "eval" / "finetune_50pct.json").read_text())
    for result in (linear, finetune):
        assert 0.0 <= result["top1"] <= 100.0
    assert knn and finetune["protocol"] == "finetune"
    stages = json.loads((run / "eval" / "stages.json").read_text())
    assert stages["stages"] == {"knn": "ok", "linear": "ok", "finetune": "ok"}, stages
