"""Multi-view loss with a low-dimensional projector (Simon et al., "Harnessing small projectors and
multiple views for efficient vision pretraining", 2024).

Paper → code (seed 001, Eq. 10 as implemented by the authors):
- M ≥ 2 views z_1..z_M of a batch, mean embedding z̄ = (1/M) Σ_m z_m                    → ``loss``
- invariance of each view against the mean, O(M) (no M² pair loop):
  BT style      on_diag_weight · (1/M) Σ_m Σ_i (1 − C(z_m, z̄)_ii)²   (C: cross-correlation of standardised z)
  VICReg style  sim_coeff · (1/M) Σ_m mse(z_m, z̄)
- regulariser on z̄: BT style λ Σ_{i≠j} C(z̄, z̄)_ij²; VICReg style std_coeff·v(z̄) + cov_coeff·c(z̄)
- low-dimensional projector (in → 256 → 256, App. D.1's parameter counts) with a stronger off-diagonal
  weight, λ ≈ 1/pdim (``lambd=None`` → 1/pdim).

A weight of 0 removes its term and skips its computation (the M per-view diagonals, or the D×D matrix of
z̄). docs/methods.md lists where the authors' code (kumarkrishna/fastssl) differs.

Distributed: standardisation, diagonals and covariances are over the global batch; only C(z̄, z̄)
and Cov(z̄) are D×D (``collective`` picks all-gather or sum-reduce), the per-view diagonals cost O(N·D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum, global_gram
from largessl.methods import vicreg
from largessl.methods.barlow_twins import standardise
from largessl.methods.base import (
    METHODS,
    MethodConfig,
    SSLMethod,
    as_loss_dtype,
    check_weights,
    full_precision,
)
from largessl.methods.heads import parse_dims


@dataclass
class MultiViewConfig(MethodConfig):
    """Multi-view hyper-parameters (seed 001: M views, small projector, strong orthogonality)."""

    name: str = "multiview"
    """Method name."""
    num_views: int = 4
    """M, the number of views per image (must equal data.num_views)."""
    projector: str = "256-256"
    """Projector widths; seed 001: one hidden layer as wide as the low-dimensional output (256: 589k parameters
    on a ResNet-50, App. D.1)."""
    regularizer: Literal["barlow_twins", "vicreg"] = "barlow_twins"
    """Style of the invariance and redundancy terms: Barlow Twins (cross-correlation) or VICReg."""
    on_diag_weight: float = 1.0
    """BT style: weight of the invariance term (each view's on-diagonal term against the mean view)."""
    lambd: float | None = None
    """BT style: off-diagonal weight λ; None = 1/pdim (seed 001's best setting for small projectors)."""
    eps: float = 1e-5
    """BT style: added to the variance before standardising (as ``barlow_twins``: finite on a dead dimension)."""
    sim_coeff: float = 25.0
    """VICReg style: invariance weight."""
    std_coeff: float = 25.0
    """VICReg style: variance weight (on z̄)."""
    cov_coeff: float = 1.0
    """VICReg style: covariance weight (on z̄)."""
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"
    """How the D×D statistic of z̄ is made global (gather N·D floats or sum-reduce D² floats)."""

    def validate(self) -> None:
        """Check M, the projector spec and the weights."""
        if self.num_views < 2:
            raise ValueError(f"method.num_views must be >= 2 (got {self.num_views})")
        parse_dims(self.projector)
        if self.regularizer == "barlow_twins":
            check_weights({"on_diag_weight": self.on_diag_weight, "lambd": self.lambd})
        else:
            check_weights({"sim_coeff": self.sim_coeff, "std_coeff": self.std_coeff, "cov_coeff": self.cov_coeff})
        if self.eps < 0:
            raise ValueError(f"method.eps must be >= 0 (got {self.eps})")


def _check_views(zs: list[torch.Tensor]) -> None:
    if len(zs) < 2:
        raise ValueError(f"the multi-view loss needs at least 2 views, got {len(zs)}")
    if zs[0].dim() != 2 or any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"the multi-view loss needs M (N, D) embeddings of equal shape, got "
                         f"{[tuple(z.shape) for z in zs]}; every view must go through the same projector")


def loss(zs: list[torch.Tensor], regularizer: str = "barlow_twins", lambd: float | None = None,
         group: ProcessGroup | None = None, eps: float = 1e-5, sim_coeff: float = 25.0, std_coeff: float = 25.0,
         cov_coeff: float = 1.0, collective: str = "auto",
         on_diag_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-view loss of M views against their mean, over the global batch; returns (loss, terms).

    A term whose weight is 0 is neither computed nor reported.
    """
    _check_views(zs)
    d = zs[0].shape[1]
    parts: list[torch.Tensor] = []
    terms: dict[str, torch.Tensor] = {}
    with full_precision(zs[0]):
        zs = [as_loss_dtype(z) for z in zs]
        z_bar = torch.stack(zs).mean(0)
        if regularizer == "barlow_twins":
            lam = 1.0 / d if lambd is None else lambd
            check_weights({"on_diag_weight": on_diag_weight, "lambd": lam})
            bar_n, n = standardise(z_bar, group, eps)
            if on_diag_weight:
                # Diagonal of C(z_m, z̄) for every view at once: O(M·N·D), one all-reduce of M·D floats.
                diags = torch.stack([(standardise(z, group, eps)[0] * bar_n).sum(0) for z in zs])
                diags = all_reduce_sum(diags, group) / n
                inv = (1 - diags).pow(2).sum(1).mean()
                parts.append(on_diag_weight * inv)
                terms["invariance"] = inv.detach()
            if lam:
                c = global_gram(bar_n, None, group, collective) / n
                reg = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
                parts.append(lam * reg)
                terms["off_diag"] = reg.detach()
        elif regularizer == "vicreg":
            check_weights({"sim_coeff": sim_coeff, "std_coeff": std_coeff, "cov_coeff": cov_coeff})
            if sim_coeff:
                inv = torch.stack([vicreg.invariance(z, z_bar, group) for z in zs]).mean()
                parts.append(sim_coeff * inv)
                terms["invariance"] = inv.detach()
            if std_coeff or cov_coeff:
                v, c = vicreg.variance_covariance(z_bar, 1.0, 1e-4, group, collective, bool(std_coeff),
                                                  bool(cov_coeff))
                if v is not None:
                    parts.append(std_coeff * v)
                    terms["variance"] = v.detach()
                if c is not None:
                    parts.append(cov_coeff * c)
                    terms["covariance"] = c.detach()
        else:
            raise ValueError(f"unknown multi-view regularizer {regularizer!r}; valid: barlow_twins, vicreg")
        total = parts[0]
        for p in parts[1:]:
            total = total + p
    return total, terms


@METHODS.register("multiview", config=MultiViewConfig)
class MultiView(SSLMethod):
    """Backbone → small projector on M views → invariance to the mean view + regulariser on the mean."""

    cfg: MultiViewConfig

    def check_views(self, views: Sequence[torch.Tensor]) -> None:
        """M views, as many as ``method.num_views``."""
        if len(views) != self.cfg.num_views:
            raise ValueError(f"multiview expects method.num_views={self.cfg.num_views} views, got {len(views)}; "
                             "set data.num_views and method.num_views to the same M")

    def objective(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Invariance of every view to the mean view plus the regulariser on the mean."""
        c = self.cfg
        return loss(z, c.regularizer, c.lambd, self.group, c.eps, c.sim_coeff, c.std_coeff, c.cov_coeff,
                    c.collective, c.on_diag_weight)
