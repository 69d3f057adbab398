"""DeepSpeed on CPU/gloo: LARS under ZeRO-1/2 equals the DDP step; ZeRO-2 pretraining runs, saves, resumes;
a DeepSpeed whose ZeRO optimizer lacks the private layout LARS reads fails at start-up naming its version."""

from __future__ import annotations

import os
import re
from importlib.metadata import version

import pytest
import torch
from dist_harness import run_distributed
from torch import nn
from train_procs import TINY, dump_logs, launch, logged_steps, wait_all

from largessl.train.config import OptimConfig, TrainConfig
from largessl.train.deepspeed_engine import TESTED_DEEPSPEED, ZERO_LAYOUT_ATTRIBUTES, is_tested_deepspeed
from largessl.train.optim import LARS, build_optimizer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")


def _net() -> nn.Module:
    torch.manual_seed(0)
    # 6*8 + 8*3 = 72 weight entries: on 2 ranks the first layer straddles the partition boundary.
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _lars_zero_vs_ddp(rank: int, world: int, stage: int, attach: bool) -> float:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed insists on it; torchrun sets it in real runs
    import deepspeed

    from largessl.train import deepspeed_engine

    cfg = OptimConfig(name="lars", weight_decay=1e-2, eta=0.02)
    ref = _net()
    ddp = nn.parallel.DistributedDataParallel(ref)
    ref_opt = build_optimizer(ref, cfg, lr=0.5, bias_norm_lr=0.1)
    ds_model = _net()
    ds_opt = build_optimizer(ds_model, cfg, lr=0.5, bias_norm_lr=0.1)
    assert isinstance(ds_opt, LARS)
    conf = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * world,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, config=conf, dist_init_required=False)
    if attach:
        deepspeed_engine.attach_zero_layout(ds_opt, engine.optimizer)
    for step in range(3):
        x, y = _batch(rank, step)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        ref_opt.step()
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), engine.module.parameters()))
    return diff


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])  # stage 1: > 20 s on 2 cores
def test_lars_under_zero_equals_ddp_step(stage):
    diffs = run_distributed(_lars_zero_vs_ddp, 2, stage, True)
    assert max(diffs) < 1e-6, diffs
    if stage == 2:
        # Without the layer map a ZeRO partition mixes layers and the trust ratios are wrong: the test can fail.
        naive = run_distributed(_lars_zero_vs_ddp, 2, stage, False)
        assert max(naive) > 1e-4, naive


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_zero2_pretraining_smoke_and_resume(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", "train.global_batch_size=8", "dist.strategy=deepspeed",
            "dist.zero_stage=2", "checkpoint.every_steps=2"]
    assert wait_all(launch(2, 64, [*args, "train.num_steps=3"], logs)) == [0, 0], dump_logs(logs)
    assert wait_all(launch(2, 64, [*args, "--allow-change=train.num_steps", "train.num_steps=5"], logs)) == [0, 0], dump_logs(logs)
    recs = logged_steps(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert "resumed from" in dump_logs(logs) and "ZeRO stage 2" in dump_logs(logs)
    ckpt = run / "checkpoints" / "step-00000005"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "model.safetensors").is_file()
    from largessl.run.checkpoint import load_model_state, verify_checkpoint

    marker = verify_checkpoint(str(ckpt))
    assert any(f.startswith("deepspeed/") for f in marker["files"])
    state, _, meta = load_model_state(run)  # consumers need no DeepSpeed
    assert meta["step"] == 5 and meta["strategy"] == "deepspeed"



def _start_with_a_zero_optimizer_lacking(rank: int, world: int, attribute: str) -> str:
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from largessl.run.precision import resolve_precision
    from largessl.train.deepspeed_engine import build_engine

    # The real ZeRO optimizer class, made to behave like a release that no longer sets ``attribute``.
    init = DeepSpeedZeroOptimizer.__init__

    def init_without(self, *args, **kwargs):
        init(self, *args, **kwargs)
        delattr(self, attribute)

    DeepSpeedZeroOptimizer.__init__ = init_without
    model = _net()
    opt = build_optimizer(model, OptimConfig(name="lars"), lr=0.5, bias_norm_lr=0.1)
    device = torch.device("cpu")
    try:
        build_engine(model, opt, 2, 4, world, 0.0, resolve_precision(TrainConfig(device="cpu"), device), device)
    except RuntimeError as e:
        return str(e)
    return "build_engine started without the ZeRO partition layout"


def test_missing_private_zero_layout_fails_at_start_up_naming_the_version():
    (message,) = run_distributed(_start_with_a_zero_optimizer_lacking, 1, "round_robin_bit16_padding")
    assert f"DeepSpeed {version('deepspeed')}" in message, message
    assert "round_robin_bit16_padding" in message and "DeepSpeedZeroOptimizer" in message, message
    assert f"deepspeed{TESTED_DEEPSPEED}" in message and "dist.zero_stage=0" in message, message
    assert "round_robin_bit16_groups" not in message  # only what is really missing is named
    assert set(ZERO_LAYOUT_ATTRIBUTES) >= {"round_robin_bit16_padding", "partition_size"}


def test_declared_deepspeed_range_is_the_tested_one_and_holds_the_installed_release(repo_root):
    declared = re.findall(r'^deepspeed = \[(.*)\]$', (repo_root / "pyproject.toml").read_text(), re.M)
    assert declared == [f'"deepspeed{TESTED_DEEPSPEED}"'], declared
    assert is_tested_deepspeed(version("deepspeed")), (version("deepspeed"), TESTED_DEEPSPEED)
    assert [is_tested_deepspeed(v) for v in ("0.19.0", "0.19.8+cpu", "0.18.9", "0.20.0", "1.19.0", "x")] == \
        [True, True, False, False, False, False]


def _backbone_dtypes_under_deepspeed(rank: int, world: int, run_dir: str) -> dict[str, object]:
    """Two bf16 ZeRO-2 training steps through the trainer's DeepSpeed engine, with
    ``torch.is_autocast_enabled()`` (no argument) reporting the training device's autocast, as it does for
    CUDA on a GPU: DeepSpeed's ``autocast_if_enabled`` then sees our autocast and, with no ``torch_autocast``
    section in its config, switches the accelerator's autocast off around the module."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)
    from synthetic_stream import SyntheticStream

    from largessl.config import load_config
    from largessl.distributed.env import DistEnv
    from largessl.train.step import train_step
    from largessl.train.trainer import Trainer

    orig = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *a: orig("cpu") if not a else orig(*a)
    try:
        cfg = load_config(None, ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32",
                                 "train.global_batch_size=8", "train.device=cpu", "train.precision=bf16",
                                 "dist.strategy=deepspeed", "dist.zero_stage=2", "eval.online_probe=false",
                                 "log.progress=false", "data.num_workers=0", "optim.warmup_epochs=1",
                                 f"train.run_dir={run_dir}"])
        trainer = Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32)
        assert trainer.engine is not None
        seen: dict[str, set] = {"conv": set(), "loss": set()}
        for conv in (m for m in trainer.module.backbone.modules() if isinstance(m, nn.Conv2d)):
            conv.register_forward_hook(lambda m, i, o: seen["conv"].add(str(o.dtype)))
        batch = next(iter(trainer.stream.iterate(0)))
        for step in range(2):
            out = train_step(trainer.model, batch.views, step, trainer.optimizer, trainer.policy, trainer.scaler,
                             0.0, trainer.engine)
            seen["loss"].add(str(out.loss.dtype))
        return {k: sorted(v) for k, v in seen.items()}
    finally:
        torch.is_autocast_enabled = orig


def test_bf16_autocast_reaches_the_backbone_inside_the_deepspeed_engine(tmp_path):
    (seen,) = run_distributed(_backbone_dtypes_under_deepspeed, 1, str(tmp_path / "run"))
    assert seen["conv"] == ["torch.bfloat16"], f"backbone convolutions ran in {seen['conv']} under DeepSpeed"
    assert seen["loss"] == ["torch.float32"], seen
