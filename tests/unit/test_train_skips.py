"""Skip counters are whole-run totals: logged (samples and shards), saved with the data position, continued on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from largessl.config import load_config
from largessl.data.manifest import read_manifest
from largessl.data.stream import build_train_stream
from largessl.distributed.env import DistEnv
from largessl.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _shards(dest: Path) -> str:
    from test_data_stream import _jpeg, write_uneven

    url = write_uneven(dest, sizes=[16, 16, 16, 16], bad={3: b"not a jpeg", 20: _jpeg(20)[:40]})
    victim = Path(read_manifest(url).shards[3].url)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a shard that fails mid-read
    return url


def _fit(run: Path, manifest_url: str, steps: int):
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32",
                             "train.global_batch_size=8", "optim.warmup_epochs=1", "log.progress=false",
                             "log.tensorboard=false", "eval.online_probe=false", "data.num_workers=0",
                             "data.augment=small", "data.image_size=16", "data.retries=1", "data.retry_backoff_s=0",
                             "train.log_every=4", f"train.num_steps={steps}", f"train.run_dir={run}"])
    manifest = read_manifest(manifest_url)
    stream = build_train_stream(cfg.data, manifest, 8, 0, 1, cfg.train.seed)
    # the second run extends the first: a schedule change, allowed explicitly (as `--allow-change` would)
    return Trainer(cfg, DistEnv(), stream, manifest.num_samples, allow_change=["train.num_steps"]).fit()


def test_skip_counters_are_logged_saved_and_continue_after_resume(tmp_path: Path) -> None:
    url = _shards(tmp_path / "d")
    run = tmp_path / "run"
    assert _fit(run, url, 8).exit_code == 0  # one epoch (64 samples / 8)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = recs[-1]
    assert first["step"] == 8 and first["skipped_shards"] == 1
    lost = first["skipped_samples"]
    assert lost >= 2 + 1  # the two bad samples and part of the truncated shard
    assert _fit(run, url, 16).exit_code == 0  # resumed: a fresh stream and trainer, counters continue
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in recs] == [4, 8, 12, 16]  # (the allowed-change event at step 8 left out)
    assert recs[-1]["skipped_shards"] == 2 and recs[-1]["skipped_samples"] == 2 * lost
    assert recs[2]["skipped_samples"] >= lost  # never restarts at 0
    from largessl.run.checkpoint import load_rank_state

    pos = load_rank_state(run / "checkpoints" / "step-00000016", 0)["data"]
    assert pos["skipped_samples"] == 2 * lost and pos["skipped_shards"] == 2
