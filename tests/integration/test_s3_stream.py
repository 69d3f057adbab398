"""Shards written to a real S3 server (SeaweedFS) with `largessl shards write`, streamed back through s3fs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from largessl.cli import main
from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.stream import build_eval_stream, build_train_stream


def _image_folder(root: Path, per_class: int = 6) -> dict[str, str]:
    """A small ImageFolder tree of real JPEGs; returns {relative stem: class name}."""
    truth = {}
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 30 + c), colour).save(d / f"img{i}.jpg", quality=90)
            truth[f"class{c}/img{i}"] = f"class{c}"
    return truth


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The standard AWS_* variables pointing at the test server (how users configure endpoint and keys)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_write_to_s3_and_stream_back(aws_env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    truth = _image_folder(src)
    dest = aws_env.url("imgs", "train")
    assert main(["shards", "write", str(src), dest, "--shard-size", "4KB", "--workers", "3", "--no-progress"]) == 0
    url = dest + "/manifest.json"
    # a complete dataset is not overwritten by accident
    assert main(["shards", "write", str(src), dest, "--no-progress"]) == 2
    assert main(["shards", "verify", url]) == 0

    manifest = read_manifest(url)
    assert manifest.num_samples == len(truth)
    assert len(manifest.shards) > 2
    assert manifest.class_names == ["class0", "class1", "class2"]
    assert all(s.url.startswith("s3://") and len(s.sha256) == 64 for s in manifest.shards)

    cfg = DataConfig(train_manifest=url, augment="small", image_size=16, num_workers=2, shuffle_buffer=4,
                     retry_backoff_s=0.01)
    stream = build_train_stream(cfg, manifest, per_rank_batch_size=4, rank=0, world_size=1, seed=3)
    keys, labels = [], []
    for batch in stream.iterate(0):
        assert batch.views[0].shape == (4, 3, 16, 16)
        keys += batch.keys
        labels += batch.labels.tolist()
    assert len(keys) == stream.batches_per_epoch * 4 == 16
    assert len(set(keys)) == len(keys)

    # every sample once through the eval stream, with the right label (images are one colour per class)
    ev = build_eval_stream(cfg, manifest, batch_size=5, rank=0, world_size=1)
    seen = {}
    for batch in ev:
        for key, label, img in zip(batch.keys, batch.labels.tolist(), batch.views[0]):
            seen[key] = label
            assert int(img.mean(dim=(1, 2)).argmax()) == label  # red, green, blue classes
    assert len(seen) == len(truth)
    assert sorted(seen.values()) == sorted(int(c[-1]) for c in truth.values())


def test_missing_s3_shard_fails_at_startup(aws_env, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _image_folder(src, per_class=2)
    dest = aws_env.url("imgs", "missing")
    assert main(["shards", "write", str(src), dest, "--shard-size", "2KB", "--no-progress"]) == 0
    manifest = read_manifest(dest + "/manifest.json")
    fs = aws_env.filesystem()
    fs.rm(manifest.shards[1].url[len("s3://"):])
    with pytest.raises(ValueError, match=manifest.shards[1].url):  # missing is bad input (2), not a server error
        read_manifest(dest + "/manifest.json")


def test_endpoint_from_config_without_env(s3_server, tmp_path: Path, monkeypatch) -> None:
    """The endpoint may come from data.endpoint_url while keys come from the environment."""
    src = tmp_path / "src"
    _image_folder(src, per_class=2)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    dest = s3_server.url("imgs", "cfg-endpoint")
    assert main(["shards", "write", str(src), dest, "--no-progress"]) == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "AWS_ENDPOINT_URL" not in os.environ
    from largessl.data import io

    opts = io.storage_options_for(dest, s3_server.endpoint_url)
    manifest = read_manifest(dest + "/manifest.json", opts)
    cfg = DataConfig(endpoint_url=s3_server.endpoint_url, augment="none", image_size=16, num_workers=0)
    stream = build_train_stream(cfg, manifest, per_rank_batch_size=2, rank=0, world_size=1, seed=0)
    assert sum(len(b.keys) for b in stream.iterate(0)) == 6


def test_webdataset_reads_s3_through_registered_opener(aws_env, tmp_path: Path) -> None:
    """webdataset has no s3:// opener of its own; ours routes it through fsspec with the same credentials."""
    import webdataset as wds

    from largessl.data.io import register_webdataset_openers

    src = tmp_path / "src"
    truth = _image_folder(src, per_class=2)
    dest = aws_env.url("imgs", "wds")
    assert main(["shards", "write", str(src), dest, "--no-progress", "--no-shuffle"]) == 0
    manifest = read_manifest(dest + "/manifest.json")
    register_webdataset_openers()
    samples = list(wds.WebDataset([s.url for s in manifest.shards], shardshuffle=False))
    assert len(samples) == len(truth)
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 1, 1, 2, 2]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_pretrain_checkpoints_on_s3_with_only_data_endpoint_url(s3_server, tmp_path: Path, monkeypatch,
                                                                strategy: str) -> None:
    """2 ranks save to and resume from S3 through the trainer's own path (DDP, DeepSpeed ZeRO-2); the endpoint
    comes from data.endpoint_url alone (no AWS_ENDPOINT_URL), the keys from the environment."""
    import cli_runs

    from largessl.data.digits import write_digits_shards
    from largessl.run.checkpoint import MARKER, load_model_state

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    train, _ = write_digits_shards(s3_server.url("digits16"), image_size=16)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    ckpt_url = s3_server.url(f"runs-{strategy}", "checkpoints")
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = [*cli_runs.SMALL, f"data.train_manifest={train}", f"data.endpoint_url={s3_server.endpoint_url}",
            f"checkpoint.dir={ckpt_url}", f"train.run_dir={run}", "checkpoint.every_steps=2", "data.num_workers=1"]
    if strategy == "deepspeed":
        args += ["dist.strategy=deepspeed", "dist.zero_stage=2"]
    assert cli_runs.wait(cli_runs.start([*args, "train.num_steps=3"], logs, world=2)) == [0, 0], cli_runs.logs(logs)

    fs = s3_server.filesystem()
    root = ckpt_url[len("s3://"):]

    def step_folders() -> list[str]:  # folders holding files (SeaweedFS keeps empty folder entries after a delete)
        fs.invalidate_cache()
        return sorted({p[len(root) + 1:].split("/")[0] for p in fs.find(root) if "/step-" in p})

    assert step_folders() == ["step-00000002", "step-00000003"]
    files = fs.find(f"{root}/step-00000003")
    if strategy == "deepspeed":
        assert any("zero_pp_rank_1_" in f for f in files) and any("mp_rank_00_model_states" in f for f in files)
    # an upload cut short by a killed process: no marker; the next run removes it before writing anything
    fs.pipe(f"{root}/step-00000004/model.safetensors", b"partial upload")

    assert cli_runs.wait(cli_runs.start([*args, "--allow-change=train.num_steps", "train.num_steps=5"], logs, world=2)) == [0, 0], cli_runs.logs(logs)
    text = cli_runs.logs(logs)
    assert f"removed interrupted save {ckpt_url}/step-00000004" in text
    assert f"resumed from {ckpt_url}/step-00000003 at step 3" in text
    assert cli_runs.steps(run) == [1, 2, 3, 4, 5]
    assert step_folders() == ["step-00000004", "step-00000005"]
    assert fs.exists(f"{root}/step-00000005/{MARKER}")
    state, _, meta = load_model_state(ckpt_url, endpoint_url=s3_server.endpoint_url)  # consumers: no DeepSpeed
    assert meta["step"] == 5 and meta["strategy"] == strategy and any(k.startswith("backbone.") for k in state)
