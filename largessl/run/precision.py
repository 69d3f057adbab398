"""Precision and speed switches: autocast dtype, GradScaler, channels_last, torch.compile."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largessl.train.config import TrainConfig

log = logging.getLogger(__name__)

_AUTOCAST_HOOKED = "_largessl_autocast_inside"
"""Attribute set on a module whose forward enters the policy's autocast itself (see autocast_inside)."""
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Resolved choices for one device."""

    dtype: torch.dtype
    """Autocast dtype of the backbone; float32 = autocast off."""
    use_scaler: bool
    """fp16 needs a GradScaler; bf16 and fp32 do not."""
    channels_last: bool
    """NHWC inputs and weights (faster convolutions on tensor cores)."""
    compile: bool
    """torch.compile the backbone."""
    device_type: str

    @property
    def name(self) -> str:
        """fp32, bf16 or fp16."""
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast region for the forward pass (methods keep batch statistics and losses in fp32)."""
        if self.dtype == torch.float32:
            yield
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.dtype):
                yield

    def autocast_inside(self, module: nn.Module) -> None:
        """Make ``module``'s own call enter :meth:`autocast` (idempotent; the state_dict keys do not change).

        DeepSpeed runs its module under ``deepspeed/runtime/torch_autocast.py:autocast_if_enabled``: when
        ``torch.is_autocast_enabled()`` is true (on a GPU: CUDA autocast is on) and the DeepSpeed config has no
        ``torch_autocast`` section, it enters ``torch.autocast(device_type=..., enabled=False)`` around the
        module, so an autocast region outside ``engine(...)`` never reaches the backbone. A forward pre-hook
        enters the region inside the module DeepSpeed wraps, below DeepSpeed's context; the matching forward
        hook (``always_call``: it runs when the forward raises too) leaves it. A hook pair instead of a wrapper
        module keeps the parameter names, so DeepSpeed checkpoints keep their keys.
        """
        if self.dtype == torch.float32 or getattr(module, _AUTOCAST_HOOKED, False):
            return
        stack: list[contextlib.AbstractContextManager[None]] = []

        def enter(mod: nn.Module, args: Any) -> None:
            ctx = torch.autocast(device_type=self.device_type, dtype=self.dtype)
            ctx.__enter__()
            stack.append(ctx)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
        setattr(module, _AUTOCAST_HOOKED, True)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device_type) if self.use_scaler else None


def local_cuda_index(local_rank: int, device_count: int, visible: str | None = None) -> int:
    """The CUDA ordinal for the process with node-local rank ``local_rank`` when it sees ``device_count`` devices.

    One visible device (``--gpus-per-task=1``, ``--gpu-bind``, a per-rank ``CUDA_VISIBLE_DEVICES``) is
    ordinal 0 whatever the local rank; more devices than local ranks map rank i to device i; fewer (ranks
    oversubscribe the node's devices) wrap around, with a warning, instead of failing with "invalid device
    ordinal".
    """
    if device_count < 1:
        raise RuntimeError("CUDA is available but no CUDA device is visible "
                           f"(CUDA_VISIBLE_DEVICES={visible!r}); check the job's GPU binding")
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        log.warning("local rank %d but only %d visible CUDA devices (CUDA_VISIBLE_DEVICES=%r): using cuda:%d; "
                    "several processes share a device", local_rank, device_count, visible, local_rank % device_count)
    return local_rank % device_count


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """cuda:<ordinal of local_rank> (see :func:`local_cuda_index`) when CUDA is requested or available
    (auto), else cpu."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
        index = local_cuda_index(local_rank, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_precision(cfg: TrainConfig, device: torch.device) -> PrecisionPolicy:
    """Fast defaults on GPU (bf16 if supported else fp16, channels_last); fp32 on CPU unless asked.

    On CPU, ``train.precision=bf16`` and ``train.channels_last=true`` are honoured (CPU autocast supports
    bf16), so the GPU's precision and layout paths run in CI; ``auto`` stays fp32 and contiguous there.
    Losses and batch statistics are fp32 under any policy (the methods leave autocast for them).
    """
    if device.type == "cpu":
        name = cfg.precision
        if name == "fp16":
            log.warning("train.precision=fp16 is ignored on CPU (no GradScaler path there): training runs in fp32; "
                        "use bf16 to exercise mixed precision on CPU")
            name = "fp32"
        if name == "auto":
            name = "fp32"
        return PrecisionPolicy(_DTYPES[name], False, bool(cfg.channels_last), cfg.compile, "cpu")
    name = cfg.precision
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    channels_last = True if cfg.channels_last is None else cfg.channels_last
    return PrecisionPolicy(_DTYPES[name], name == "fp16", channels_last, cfg.compile, device.type)
