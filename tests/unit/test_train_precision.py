"""The GPU's precision and layout paths, run on CPU: bf16 autocast, channels_last, torch.compile, sync_bn.

On GPU the trainer defaults to bf16 autocast with channels_last and may compile the backbone; none of it
would run in CI unless CPU runs it too. These tests train a few steps with each switch, check where the
dtypes are what the design says (backbone activations bf16; loss, batch statistics and BN buffers fp32),
and check that checkpoints cross the compile boundary in both directions.
"""

from __future__ import annotations

import json

import pytest
import torch
from synthetic_stream import SyntheticStream
from torch import nn

from largessl.config import load_config
from largessl.distributed.env import DistEnv
from largessl.models.state_dict import strip_compile_prefix
from largessl.run.checkpoint import load_model_state
from largessl.train.trainer import Trainer

BASE = ["method.projector=32-32", "train.global_batch_size=8", "train.deterministic=true", "optim.warmup_epochs=1",
        "log.progress=false", "data.num_workers=0", "train.log_every=1", "checkpoint.every_steps=2",
        "train.device=cpu", "eval.online_probe=false"]
RESNET = ["model.arch=resnet18", "model.small_input=true"]


def _trainer(run_dir, *extra) -> Trainer:
    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE, f"train.run_dir={run_dir}", *extra])
    # these tests extend a run to more steps: a schedule change, allowed explicitly as `--allow-change` would
    return Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32, allow_change=["train.num_steps"])


class _Probe:
    """Forward hooks that record dtypes and layouts seen during training."""

    def __init__(self, trainer: Trainer) -> None:
        self.conv_out: set[torch.dtype] = set()
        self.conv_in_channels_last: set[bool] = set()
        self.loss: set[torch.dtype] = set()
        module = trainer.module
        conv = next(m for m in module.backbone.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(self._conv)
        module.register_forward_hook(self._method)

    def _conv(self, mod, inputs, out) -> None:
        self.conv_out.add(out.dtype)
        self.conv_in_channels_last.add(inputs[0].is_contiguous(memory_format=torch.channels_last))

    def _method(self, mod, inputs, out) -> None:
        self.loss.add(out.loss.dtype)


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(run, *RESNET, "train.precision=bf16", "train.channels_last=true", "train.num_steps=4",
                       "model.sync_bn=true")
    probe = _Probe(trainer)
    res = trainer.fit()
    assert res.exit_code == 0 and res.step == 4
    assert trainer.policy.dtype == torch.bfloat16 and trainer.policy.channels_last
    assert probe.conv_out == {torch.bfloat16}, "autocast did not run the backbone in bf16"
    assert probe.conv_in_channels_last == {True}
    assert probe.loss == {torch.float32}, "the loss must stay fp32 under bf16 autocast"
    # batch statistics: every BN buffer (backbone and projector) is fp32
    for name, buf in trainer.module.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    # resume continues from the bf16 run's checkpoint
    again = _trainer(run, *RESNET, "train.precision=bf16", "train.channels_last=true", "train.num_steps=6",
                     "model.sync_bn=true").fit()
    assert again.exit_code == 0 and again.step == 6
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_auto_precision_on_cpu_stays_fp32(tmp_path):
    trainer = _trainer(tmp_path / "run", *RESNET, "train.num_steps=1")
    assert trainer.policy.dtype == torch.float32 and not trainer.policy.channels_last


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_compiled_checkpoints_load_without_compile_and_back(tmp_path):
    """compile=true → resume with compile=false → resume with compile=true: keys stay plain throughout."""
    run = tmp_path / "run"
    small = ["model.arch=repro_convnet", "train.precision=bf16", "train.channels_last=true"]
    first = _trainer(run, *small, "train.compile=true", "train.num_steps=2")
    probe = _Probe(first)
    assert first.fit().step == 2
    assert probe.conv_out == {torch.bfloat16} and probe.loss == {torch.float32}
    state, _, _ = load_model_state(run)
    assert not [k for k in state if "_orig_mod" in k], "a compiled run must save plain keys"
    assert _trainer(run, *small, "train.compile=false", "train.num_steps=4").fit().step == 4
    assert _trainer(run, *small, "train.compile=true", "train.num_steps=6").fit().step == 6
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_torch_compile_wrapper_keys_are_stripped():
    """A state_dict written through a torch.compile wrapper loads into a plain module (and the reverse)."""
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    wrapped = torch.compile(plain)
    keys = list(wrapped.state_dict())
    assert keys and all(k.startswith("_orig_mod.") for k in keys)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(strip_compile_prefix(wrapped.state_dict()), strict=True)
    nested = {f"backbone._orig_mod.{k}": v for k, v in plain.state_dict().items()}
    assert set(strip_compile_prefix(nested)) == {f"backbone.{k}" for k in plain.state_dict()}


def test_non_finite_state_is_never_saved(tmp_path):
    """An update that makes the weights non-finite is caught at the save; the last good save stays latest."""
    run = tmp_path / "run"
    assert _trainer(run, *RESNET, "train.num_steps=2").fit().step == 2
    trainer = _trainer(run, *RESNET, "train.num_steps=6", "train.log_every=100")
    victim = trainer.module.projector[0].weight

    def diverge(opt, args, kwargs) -> None:
        # The 4th optimizer step leaves an Inf weight; its loss was still finite (computed before the
        # update), so only the save-time check can see it. On GPU no per-step check would either.
        if trainer.step == 3:
            with torch.no_grad():
                victim[0, 0] = float("inf")

    trainer.optimizer.register_step_post_hook(diverge)
    with pytest.raises(FloatingPointError, match="the parameters hold NaN/Inf at step 4"):
        trainer.fit()
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names == ["step-00000002"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))
