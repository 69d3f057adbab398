"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

Paper → code (seed 002, Algorithm 1):
- z_a_norm = (z_a − mean(z_a, 0)) / std(z_a, 0)    → ``_standardise`` (global batch mean / biased std)
- c = z_a_normᵀ z_b_norm / N                        → ``cross_correlation`` (N = real global batch)
- L = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij², λ = 5e-3   → ``loss``
- projector 8192-8192-8192 (Linear-BN-ReLU ×2, Linear) → ``BarlowTwins.projector``

Distributed: the batch statistics and C are over the global batch. Two exact collectives compute C:
``all_gather`` the standardised embeddings (moves N·D floats) or sum-reduce the local N_r·C_r
(moves D² floats). ``collective="auto"`` picks whichever moves fewer floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.dist.collectives import all_gather_with_grad, all_reduce_sum, get_world_size
from largessl.methods.base import METHODS, MethodConfig, MethodOutput, check_finite
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
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"
    """How C is made global: gather embeddings (N·D floats) or sum-reduce C (D² floats); auto picks the smaller."""

    def validate(self) -> None:
        """Check the projector spec and λ."""
        parse_dims(self.projector)
        if self.lambd < 0:
            raise ValueError(f"method.lambd must be >= 0 (got {self.lambd})")


def _standardise(z: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """(z − μ) / σ per dimension with μ, σ over the global batch (biased σ, as BatchNorm1d(affine=False))."""
    mean, var, _ = global_mean_var(z, group)
    # eps matches the reference's BatchNorm1d default and keeps a dead dimension finite.
    return (z - mean) * torch.rsqrt(var + 1e-5)


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, group: ProcessGroup | None = None,
                      collective: str = "auto") -> torch.Tensor:
    """Global-batch cross-correlation matrix C (D×D) of the standardised embeddings."""
    a, b = _standardise(z_a, group), _standardise(z_b, group)
    world = get_world_size(group)
    n_local, d = a.shape
    if collective == "auto":
        collective = "all_gather" if 2 * n_local * d * world < d * d else "all_reduce"
    if world > 1 and collective == "all_gather":
        a, b = all_gather_with_grad(a, group), all_gather_with_grad(b, group)
        return a.T @ b / a.shape[0]
    # Sum-reduce the unnormalised local products; divide by the real global count.
    c = all_reduce_sum(a.T @ b, group)
    return c / (n_local * world)


def loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3, group: ProcessGroup | None = None,
         collective: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins loss (Algorithm 1) over the global batch; returns (loss, {on_diag, off_diag})."""
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"Barlow Twins needs two (N, D) embeddings of equal shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    c = cross_correlation(z_a.float(), z_b.float(), group, collective)
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
        self.cfg = cfg
        self.group = group
        self.backbone = backbone
        self.projector = mlp(backbone.num_features, parse_dims(cfg.projector), group=group)

    def forward(self, views: list[torch.Tensor], step: int | None = None) -> MethodOutput:
        """Loss of the first two views (the recipe makes exactly two)."""
        if len(views) != 2:
            raise ValueError(f"barlow_twins expects 2 views, got {len(views)}; set data.num_views=2")
        feats = [self.backbone(v) for v in views]
        z = [self.projector(f) for f in feats]
        total, terms = loss(z[0], z[1], self.cfg.lambd, self.group, self.cfg.collective)
        if not total.is_cuda:
            check_finite("barlow_twins loss", total, step)
        return MethodOutput(loss=total, metrics=terms, embeddings=[t.detach() for t in z],
                            features=feats[0].detach())
