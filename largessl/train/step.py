"""One optimizer step: forward under autocast, backward, clip, optimizer step (DDP or DeepSpeed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from largessl.methods.base import MethodOutput
from largessl.run.precision import PrecisionPolicy


def train_step(model: nn.Module, views: list[torch.Tensor], step: int, optimizer: Optimizer,
               policy: PrecisionPolicy, scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
               engine: Any = None) -> MethodOutput:
    """Run forward/backward/update for one batch; returns the method's output (no host sync here).

    ``model`` is the (DDP-wrapped) method module; with DeepSpeed, ``engine`` replaces both model and
    optimizer (it owns gradient reduction, partitioning and clipping).
    """
    if engine is not None:
        # No autocast out here: DeepSpeed would switch it off around the module (autocast_if_enabled);
        # build_engine made the wrapped module enter the policy's autocast itself.
        out = engine(views, step)
        engine.backward(out.loss)
        engine.step()
        return out
    optimizer.zero_grad(set_to_none=True)
    with policy.autocast():
        out = model(views, step)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return out
