"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

Paper → code (seed 002, Algorithm 1 and Eq. 1):
- z_norm = (z − z.mean(0)) / z.std(0)               → ``standardise`` (global-batch mean, unbiased std,
  plus ``eps`` = 1e-5 under the square root; see below)
- c = z_a_normᵀ z_b_norm / N                        → ``cross_correlation`` (N = real global batch)
- L = w_on Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij², w_on = 1, λ = 5e-3  → ``loss`` (``on_diag_weight``, ``lambd``);
  a weight of 0 drops its term (seed 002 Table 5's "only off-diagonal" / "only on-diagonal" ablations),
  and λ = 0 never forms the D×D matrix C: only its diagonal (O(N·D), one all-reduce of D floats).
- projector 8192-8192-8192 (Linear-BN-ReLU ×2, Linear) → ``BarlowTwins.projector``

Change from Algorithm 1: it divides by z.std(0) with no eps, so a dead projector dimension (constant over
the batch) gives 0/0 = NaN in the loss and its gradient. The reference code standardises with
``BatchNorm1d(affine=False)`` (biased variance, eps 1e-5); we keep the paper's unbiased std and add
``eps`` = 1e-5 to the variance, which leaves a dead dimension at z_norm = 0 (C_ii = 0, a loss of w_on)
with finite gradients. ``method.eps=0`` is Algorithm 1 exactly. docs/methods.md lists every difference.

Distributed: the batch statistics and C are over the global batch. Two exact collectives compute C:
all-gather the standardised embeddings (moves N·D floats) or sum-reduce the local products (moves D²
floats); ``collective="auto"`` picks whichever moves fewer floats (``dist.collectives.global_gram``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum, get_world_size, global_gram
from largessl.methods.base import (
    METHODS,
    MethodConfig,
    SSLMethod,
    as_loss_dtype,
    check_pair,
    check_weights,
    full_precision,
)
from largessl.methods.heads import parse_dims
from largessl.nn.batchnorm import global_mean_var


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins hyper-parameters (paper defaults)."""

    name: str = "barlow_twins"
    """Method name."""
    projector: str = "8192-8192-8192"
    """Projector layer widths (Linear-BN-ReLU for all but the last)."""
    on_diag_weight: float = 1.0
    """Weight of the on-diagonal (invariance) term Σ_i (1 − C_ii)²; 1 in Eq. 1, 0 drops it (seed 002 Table 5)."""
    lambd: float = 5e-3
    """Weight λ of the off-diagonal (redundancy-reduction) term Σ_{i≠j} C_ij²; 0 drops it and skips forming C."""
    eps: float = 1e-5
    """Added to the per-dimension (unbiased) variance before the square root: 1e-5 keeps a dead (constant)
    dimension finite, like the reference's BatchNorm eps; 0 is Algorithm 1 exactly (NaN on a dead dimension)."""
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"
    """How C is made global: gather embeddings (N·D floats) or sum-reduce C (D² floats); auto picks the smaller."""

    def validate(self) -> None:
        """Check the projector spec, the term weights and eps."""
        parse_dims(self.projector)
        check_weights({"on_diag_weight": self.on_diag_weight, "lambd": self.lambd})
        if self.eps < 0:
            raise ValueError(f"method.eps must be >= 0 (got {self.eps})")


def standardise(z: torch.Tensor, group: ProcessGroup | None = None,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """((z − μ) / σ, N): μ and the unbiased σ per dimension over the global batch (Algorithm 1's z.std(0))."""
    if z.shape[0] * get_world_size(group) < 2:
        raise ValueError("standardising embeddings needs a global batch of at least 2 samples")
    mean, var, n = global_mean_var(z, group)
    return (z - mean) * torch.rsqrt(var * (n / (n - 1)) + eps), n


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, group: ProcessGroup | None = None,
                      collective: str = "auto", eps: float = 1e-5) -> torch.Tensor:
    """Global-batch cross-correlation matrix C (D×D) of the standardised embeddings."""
    a, n = standardise(z_a, group, eps)
    b, _ = standardise(z_b, group, eps)
    return global_gram(a, b, group, collective) / n


def correlation_diagonal(z_a: torch.Tensor, z_b: torch.Tensor, group: ProcessGroup | None = None,
                         eps: float = 1e-5) -> torch.Tensor:
    """diag(C) without forming C: Σ_n a_ni b_ni / N over the global batch (one all-reduce of D floats)."""
    a, n = standardise(z_a, group, eps)
    b, _ = standardise(z_b, group, eps)
    return all_reduce_sum((a * b).sum(0), group) / n


def loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3, group: ProcessGroup | None = None,
         collective: str = "auto", eps: float = 1e-5,
         on_diag_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins loss (Eq. 1) over the global batch; returns (loss, {on_diag, off_diag}).

    A term whose weight is 0 is left out of the loss; with ``lambd=0`` C is not formed and ``off_diag``
    is not reported.
    """
    check_pair(z_a, z_b, "Barlow Twins")
    check_weights({"on_diag_weight": on_diag_weight, "lambd": lambd})
    with full_precision(z_a):
        z_a, z_b = as_loss_dtype(z_a), as_loss_dtype(z_b)
        if lambd == 0:
            diag = correlation_diagonal(z_a, z_b, group, eps)
            on_diag = (1 - diag).pow(2).sum()
            return on_diag_weight * on_diag, {"on_diag": on_diag.detach()}
        c = cross_correlation(z_a, z_b, group, collective, eps)
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()  # O(D) once C exists: always reported, added only when weighted
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        total = lambd * off_diag if on_diag_weight == 0 else on_diag_weight * on_diag + lambd * off_diag
    return total, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


@METHODS.register("barlow_twins", config=BarlowTwinsConfig)
class BarlowTwins(SSLMethod):
    """Backbone → projector → Barlow Twins loss on two views."""

    cfg: BarlowTwinsConfig

    def objective(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 1 on the two views' projections."""
        c = self.cfg
        return loss(z[0], z[1], c.lambd, self.group, c.collective, c.eps, c.on_diag_weight)
