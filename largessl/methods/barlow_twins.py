"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

Paper → code (seed 002, Algorithm 1):
- z_norm = (z − z.mean(0)) / z.std(0)               → ``standardise`` (global-batch mean, unbiased std)
- c = z_a_normᵀ z_b_norm / N                        → ``cross_correlation`` (N = real global batch)
- L = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij², λ = 5e-3   → ``loss``
- projector 8192-8192-8192 (Linear-BN-ReLU ×2, Linear) → ``BarlowTwins.projector``

Distributed: the batch statistics and C are over the global batch. Two exact collectives compute C:
all-gather the standardised embeddings (moves N·D floats) or sum-reduce the local products (moves D²
floats); ``collective="auto"`` picks whichever moves fewer floats (``dist.collectives.global_gram``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.dist.collectives import get_world_size, global_gram
from largessl.methods.base import (
    METHODS,
    MethodConfig,
    MethodOutput,
    as_loss_dtype,
    backbone_width,
    check_pair,
    encode_views,
    full_precision,
    method_output,
    require_views,
)
from largessl.methods.heads import mlp, parse_dims
from largessl.nn.batchnorm import global_mean_var


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins hyper-parameters (paper defaults)."""

    name: str = "barlow_twins"
    """Method name."""
    projector: str = "8192-8192-8192"
    """Projector layer widths (Linear-BN-ReLU for all but the last)."""
    lambd: float = 5e-3
    """Weight λ of the off-diagonal (redundancy-reduction) term."""
    eps: float = 0.0
    """Added to the per-dimension variance before the square root; 0 is Algorithm 1 exactly."""
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"
    """How C is made global: gather embeddings (N·D floats) or sum-reduce C (D² floats); auto picks the smaller."""

    def validate(self) -> None:
        """Check the projector spec, λ and eps."""
        parse_dims(self.projector)
        if self.lambd < 0:
            raise ValueError(f"method.lambd must be >= 0 (got {self.lambd})")
        if self.eps < 0:
            raise ValueError(f"method.eps must be >= 0 (got {self.eps})")


def standardise(z: torch.Tensor, group: ProcessGroup | None = None,
                eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """((z − μ) / σ, N): μ and the unbiased σ per dimension over the global batch (Algorithm 1's z.std(0))."""
    if z.shape[0] * get_world_size(group) < 2:
        raise ValueError("standardising embeddings needs a global batch of at least 2 samples")
    mean, var, n = global_mean_var(z, group)
    return (z - mean) * torch.rsqrt(var * (n / (n - 1)) + eps), n


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, group: ProcessGroup | None = None,
                      collective: str = "auto", eps: float = 0.0) -> torch.Tensor:
    """Global-batch cross-correlation matrix C (D×D) of the standardised embeddings."""
    a, n = standardise(z_a, group, eps)
    b, _ = standardise(z_b, group, eps)
    return global_gram(a, b, group, collective) / n


def loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3, group: ProcessGroup | None = None,
         collective: str = "auto", eps: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins loss (Algorithm 1) over the global batch; returns (loss, {on_diag, off_diag})."""
    check_pair(z_a, z_b, "Barlow Twins")
    with full_precision(z_a):
        c = cross_correlation(as_loss_dtype(z_a), as_loss_dtype(z_b), group, collective, eps)
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        total = on_diag + lambd * off_diag
    return total, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


@METHODS.register("barlow_twins", config=BarlowTwinsConfig)
class BarlowTwins(nn.Module):
    """Backbone → projector → Barlow Twins loss on two views."""

    def __init__(self, cfg: BarlowTwinsConfig, backbone: nn.Module, group: ProcessGroup | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.group = group
        self.backbone = backbone
        self.projector = mlp(backbone_width(backbone), parse_dims(cfg.projector), group=group)

    def forward(self, views: list[torch.Tensor], step: int | None = None) -> MethodOutput:
        """Loss of the two views (the recipe makes exactly two)."""
        require_views("barlow_twins", views, 2)
        feats, z = encode_views(self.backbone, self.projector, views)
        total, terms = loss(z[0], z[1], self.cfg.lambd, self.group, self.cfg.collective, self.cfg.eps)
        return method_output("barlow_twins", total, terms, step, z, feats[0])
