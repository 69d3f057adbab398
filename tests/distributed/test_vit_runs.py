"""A tiny timm ViT through the real ``largessl pretrain`` processes on digits shards: DDP and DeepSpeed ZeRO-1/2 on
2 gloo ranks, and a SIGKILLed run that resumes to bitwise the same weights and losses as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from train_procs import (
    SHARDS_TINY,
    dump_logs,
    launch_pretrain,
    logged_steps,
    probe_env,
    wait_all,
    wait_for_step,
    write_small_digits,
)

from largessl.run.checkpoint import load_model_state

pytest.importorskip("timm", reason="timm is a largessl dependency: pip install -c constraints.txt timm")

VIT = [*SHARDS_TINY, "model.arch=timm/vit_tiny_patch16_224",
       "model.timm_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "model.drop_path_rate=0.1",
       "optim.name=adamw", "optim.base_lr=0.001", "optim.bias_norm_lr=0.0", "optim.weight_decay=0.05",
       "train.grad_clip=1.0", "train.global_batch_size=16", "data.num_workers=0"]
"""16-px digits: a 2x2 patch grid + class token; drop-path on, so its random draws must resume exactly too."""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_small_digits(tmp_path_factory.mktemp("digits"))


# DeepSpeed's start-up makes each ZeRO launch ~25-30 s on 2 cores (slow tier); DDP takes ~8 s
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero1", marks=pytest.mark.slow),
                                      pytest.param("zero2", marks=pytest.mark.slow)])
def test_vit_pretrains_under_ddp_and_zero(strategy, manifest, tmp_path):
    if strategy != "ddp":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"
    dist = [] if strategy == "ddp" else ["dist.strategy=deepspeed", f"dist.zero_stage={strategy[-1]}"]
    env = {"DS_ACCELERATOR": "cpu"} if dist else {}
    args = [*VIT, f"data.train_manifest={manifest}", f"train.run_dir={run}", "train.num_steps=4", *dist]
    assert wait_all(launch_pretrain(2, args, logs, env), timeout=300) == [0, 0], dump_logs(logs)
    recs = logged_steps(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    state, config, meta = load_model_state(run)
    assert meta["step"] == 4 and config["model"]["image_size"] == 16
    assert state["backbone.pos_embed"].shape == (1, 5, 32)
    if dist:
        assert f"ZeRO stage {strategy[-1]}" in dump_logs(logs)


@pytest.mark.slow  # two runs side by side plus the rerun: ~12 s alone, more on a busy machine
def test_vit_sigkill_and_restart_is_bitwise_identical(manifest, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    args = [*VIT, f"data.train_manifest={manifest}", "train.num_steps=8", "checkpoint.every_steps=2"]
    ref_procs = launch_pretrain(1, [*args, f"train.run_dir={ref}"], logs, probe_env(tmp_path / "rec-ref"))
    procs = launch_pretrain(1, [*args, f"train.run_dir={resumed}"], logs, probe_env(tmp_path / "rec-res", 5))
    wait_for_step(resumed, 4, procs)
    time.sleep(0.1)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    assert wait_all(procs, timeout=60) == [-signal.SIGKILL]
    assert wait_all(ref_procs, timeout=300) == [0], dump_logs(logs)
    assert wait_all(launch_pretrain(1, [*args, f"train.run_dir={resumed}"], logs, probe_env(tmp_path / "rec-res")),
                    timeout=300) == [0], dump_logs(logs)
    assert "resumed from" in dump_logs(logs)
    w_ref, _, _ = load_model_state(ref)
    w_res, _, meta = load_model_state(resumed)
    assert meta["step"] == 8 and w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), f"{k} differs after resume"
    assert [(r["step"], r["loss"]) for r in logged_steps(resumed)] == [(r["step"], r["loss"]) for r in logged_steps(ref)]
