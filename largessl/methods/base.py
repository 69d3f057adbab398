"""What every SSL method provides: a config dataclass, a module returning :class:`MethodOutput`, a registry."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from largessl.registry import Registry

METHODS: Registry[type[nn.Module]] = Registry("method")
"""Method modules by name; each is registered with ``config=<its config dataclass>``."""


@dataclass
class MethodConfig:
    """Fields shared by every method's config; each method subclasses this with its own fields."""

    name: str = "barlow_twins"
    """Method name from the method registry."""

    def check_plan(self, global_batch_size: int, per_rank_batch_size: int) -> None:
        """Raise ``ValueError`` when the method cannot run with these batch sizes (e.g. DBN's rank bound)."""


@dataclass
class MethodOutput:
    """What a method's forward returns to the training step."""

    loss: torch.Tensor
    """Scalar loss to back-propagate (fp32)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar loss terms (e.g. invariance, redundancy); read with ``.item()`` only on log steps."""
    embeddings: list[torch.Tensor] = field(default_factory=list)
    """Detached per-view projector outputs (local batch), for collapse metrics."""
    features: torch.Tensor | None = None
    """Detached backbone features of the first view (local batch), for the online probe."""


def check_finite(name: str, value: torch.Tensor, step: int | None) -> None:
    """Raise ``FloatingPointError`` naming the step and the term when ``value`` holds NaN or Inf.

    This is a host-device sync: call it only where the caller already syncs (log steps) or on CPU.
    """
    if not torch.isfinite(value).all():
        where = f" at step {step}" if step is not None else ""
        raise FloatingPointError(
            f"non-finite values in {name}{where}; lower the learning rate, check the data, or use fp32"
        )
