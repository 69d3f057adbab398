"""Precision and speed switches: autocast dtype, GradScaler, channels_last, torch.compile."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from largessl.train.config import TrainConfig

log = logging.getLogger(__name__)

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

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device_type) if self.use_scaler else None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when CUDA is requested or available (auto), else cpu."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
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
