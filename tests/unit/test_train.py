"""The trainer in one process: run directory contents, metrics fields, TensorBoard read back, completion."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic_stream import SyntheticStream

from largessl.config import load_config
from largessl.distributed.env import DistEnv
from largessl.run.checkpoint import load_model_state
from largessl.train.trainer import Trainer

TINY = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "train.global_batch_size=8",
        "train.deterministic=true", "optim.warmup_epochs=1", "log.progress=false", "data.num_workers=0"]


def _fit(run_dir, *extra, **trainer_kw):
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY, f"train.run_dir={run_dir}", *extra])
    return Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32, **trainer_kw).fit()


def test_run_directory_metrics_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    res = _fit(run, "train.num_steps=6", "train.log_every=2", "train.collapse_every=3", "checkpoint.every_steps=4")
    assert res.exit_code == 0 and res.step == 6
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.num_steps == 6
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 3, 4, 6]  # log steps plus the collapse step 3
    for r in recs:
        assert {"step", "epoch", "loss", "on_diag", "off_diag", "lr", "images_per_s", "data_wait_frac",
                "skipped_samples", "online_probe_top1"} <= set(r)
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
    assert any(k.startswith("collapse/") for k in recs[1])
    # checkpoints at step 4 (every_steps), 4 (epoch end) and 6 (end); keep=2
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    state, config, meta = load_model_state(run)
    assert meta["step"] == 6 and config["train"]["num_steps"] == 6
    assert any(k.startswith("backbone.") for k in state) and any(k.startswith("projector.") for k in state)

    # TensorBoard's own reader sees a scalar for every numeric metrics.jsonl field at the logged steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for r in recs:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                assert k in tags
                assert r["step"] in [e.step for e in acc.Scalars(k)]
    loss_events = {e.step: e.value for e in acc.Scalars("loss")}
    for r in recs:
        assert loss_events[r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_rerun_of_finished_run_does_nothing_and_extension_continues(tmp_path):
    run = tmp_path / "run"
    _fit(run, "train.num_steps=4", "train.log_every=1")
    assert json.loads((run / "pretrain-complete.json").read_text())["step"] == 4
    again = _fit(run, "train.num_steps=4", "train.log_every=1")
    assert again.exit_code == 0 and again.step == 4
    # a longer schedule is another experiment: refused unless allowed, then recorded
    with pytest.raises(ValueError, match=r"train.num_steps: 4 -> 6.*--allow-change train.num_steps"):
        _fit(run, "train.num_steps=6", "train.log_every=1")
    longer = _fit(run, "train.num_steps=6", "train.log_every=1", allow_change=["train.num_steps"])
    assert longer.step == 6
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"step": 4, "event": "config_change", "changes": {"train.num_steps": {"old": 4, "new": 6}}} in recs
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["changed"] for h in history] == [{"train.num_steps": [4, 6]}] and history[0]["step"] == 4
    assert load_config(run / "config.yaml").train.num_steps == 6
    assert json.loads((run / "pretrain-complete.json").read_text())["step"] == 6
    assert not (run / "run.lock").exists()  # released at the end


def test_resume_with_other_world_size_is_refused(tmp_path):
    run = tmp_path / "run"
    _fit(run, "train.num_steps=2")
    meta_file = next((run / "checkpoints").glob("step-*")) / "meta.json"
    # A checkpoint from 2 ranks, resumed by 1: explicit error (the marker's hash makes edits visible, so
    # forge the world size through the trainer's own path instead: a fresh checkpoint with world_size=2).
    from largessl.run import checkpoint as ck

    meta = json.loads(meta_file.read_text())
    meta["world_size"] = 2
    meta_file.write_text(json.dumps(meta))
    marker = json.loads((meta_file.parent / ck.MARKER).read_text())
    marker["files"]["meta.json"] = ck._sha256_file(meta_file)
    marker["sizes"]["meta.json"] = meta_file.stat().st_size
    (meta_file.parent / ck.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="allow_resplit"):
        _fit(run, "train.num_steps=4", allow_change=["train.num_steps"])
