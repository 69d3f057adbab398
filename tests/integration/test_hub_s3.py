"""The hub on a real S3 server (SeaweedFS): CLI round trip, immutability, tamper/truncation refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir

from largessl.cli import main
from largessl.hub import Hub, IntegrityError, load_backbone
from largessl.hub.export import load_backbone_from_checkpoint
from largessl.hub.store import BACKBONE, CARD


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """AWS_* variables pointing at the test server, as a user would configure them."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_s3_hub_round_trip_immutability_and_integrity(aws_env, tmp_path: Path, capsys) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    hub_url = aws_env.url("hub-round-trip")
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v1"]) == 0
    assert "load_backbone('bt-r18@v1'" in capsys.readouterr().out
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v2"]) == 0
    # immutability: exit code 2 (bad input) and the stored version is unchanged
    fs = aws_env.filesystem()
    root = hub_url[len("s3://"):]
    before = fs.cat_file(f"{root}/models/bt-r18/v1/{BACKBONE}")
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v1"]) == 2
    assert fs.cat_file(f"{root}/models/bt-r18/v1/{BACKBONE}") == before

    capsys.readouterr()
    assert main(["hub", "list", "--hub", hub_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bt-r18@v1 ") and out[1].startswith("bt-r18@v2 (latest)")
    assert main(["hub", "show", "bt-r18", "--hub", hub_url]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == "v2" and card["architecture"]["arch"] == "resnet18"
    assert "<svg" in fs.cat_file(f"{root}/index.html").decode()

    dest = tmp_path / "pulled"
    assert main(["hub", "pull", "bt-r18@v1", str(dest), "--hub", hub_url]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [BACKBONE, CARD]
    x = torch.randn(2, 3, 32, 32)
    ref, _, _ = load_backbone_from_checkpoint(run_dir)
    torch.testing.assert_close(load_backbone("bt-r18@v1", hub=hub_url)(x), ref.eval()(x))
    torch.testing.assert_close(load_backbone(dest)(x), ref(x))

    # tampered and truncated objects are refused and nothing is written at the destination
    fs.pipe_file(f"{root}/models/bt-r18/v2/{BACKBONE}", before[:-1] + bytes([before[-1] ^ 1]))
    assert main(["hub", "pull", "bt-r18@v2", str(tmp_path / "t1"), "--hub", hub_url]) == 3
    fs.pipe_file(f"{root}/models/bt-r18/v2/{BACKBONE}", before[: len(before) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        Hub(hub_url).pull("bt-r18@v2", tmp_path / "t2")
    with pytest.raises(IntegrityError):
        load_backbone("bt-r18@v2", hub=hub_url)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t")]
