"""VICReg: Variance-Invariance-Covariance Regularization (Bardes, Ponce, LeCun, ICLR 2022).

Paper → code (seed 003, Eq. 6 and Appendix A):
- s(Z, Z') = mean squared distance (mse over N·D)                 → ``invariance``
- v(Z) = (1/d) Σ_j max(0, γ − sqrt(Var(z^j) + ε)), γ = 1, ε = 1e-4  → ``variance`` (unbiased Var)
- c(Z) = (1/d) Σ_{i≠j} Cov(Z)_ij², Cov over the batch with /(N−1)  → ``covariance``
- ℓ = λ s + μ [v(Z) + v(Z')] + ν [c(Z) + c(Z')], λ = μ = 25, ν = 1 → ``loss`` (``std_term="paper"``)
- the reference code's variance term μ [v(Z)/2 + v(Z')/2] (half the paper's weight at the same μ;
  it produced the published 73.2%)                                 → ``std_term="reference"``
- expander 8192-8192-8192 (Linear-BN-ReLU ×2, Linear)             → ``VICReg.projector``

A coefficient of 0 removes its term and skips its computation (μ = 0: no std; ν = 0: no D×D covariance).

Distributed: every statistic is over the global batch; sums are all-reduced and divided by the real
gathered N. Cov(Z) is made global by all-gathering Z (N·D floats) or sum-reducing the centred
Zᵀ Z (D² floats), whichever moves less (``collective``).
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

STD_TERMS = ("paper", "reference")


@dataclass
class VICRegConfig(MethodConfig):
    """VICReg hyper-parameters (paper defaults)."""

    name: str = "vicreg"
    """Method name."""
    projector: str = "8192-8192-8192"
    """Expander layer widths (Linear-BN-ReLU for all but the last)."""
    sim_coeff: float = 25.0
    """λ: weight of the invariance term s."""
    std_coeff: float = 25.0
    """μ: weight of the variance term v."""
    cov_coeff: float = 1.0
    """ν: weight of the covariance term c."""
    std_term: Literal["paper", "reference"] = "paper"
    """Variance term: paper = μ[v(Z) + v(Z')] (Eq. 6); reference = μ[v(Z)/2 + v(Z')/2] (facebookresearch/vicreg)."""
    gamma: float = 1.0
    """γ: target standard deviation of each dimension."""
    eps: float = 1e-4
    """ε inside the square root of the variance term."""
    collective: Literal["auto", "all_gather", "all_reduce"] = "auto"
    """How Cov(Z) is made global: gather embeddings (N·D floats) or sum-reduce ZᵀZ (D² floats)."""

    def validate(self) -> None:
        """Check the expander spec, the coefficients and the variance-term form."""
        parse_dims(self.projector)
        check_weights({"sim_coeff": self.sim_coeff, "std_coeff": self.std_coeff, "cov_coeff": self.cov_coeff})
        for key in ("gamma", "eps"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0 (got {getattr(self, key)})")
        if self.std_term not in STD_TERMS:
            raise ValueError(f"unknown method.std_term {self.std_term!r}; valid: {', '.join(STD_TERMS)}")


def invariance(z_a: torch.Tensor, z_b: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """s(Z, Z'): mean over the global N·D entries of (z_a − z_b)²."""
    n = all_reduce_sum(z_a.new_full((), float(z_a.shape[0])), group)
    return all_reduce_sum((z_a - z_b).pow(2).sum(), group) / (n * z_a.shape[1])


def variance_covariance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4, group: ProcessGroup | None = None,
                        collective: str = "auto", variance: bool = True,
                        covariance: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(v(Z), c(Z)) over the global batch: hinge on the unbiased std, squared off-diagonal covariances / d.

    ``variance=False`` / ``covariance=False`` skip that term (returned as None); the D×D covariance is the
    expensive one.
    """
    if z.shape[0] * get_world_size(group) < 2:
        raise ValueError("VICReg's variance and covariance need a global batch of at least 2 samples")
    d = z.shape[1]
    mean, var, n = global_mean_var(z, group)
    v = c = None
    if variance:
        std = torch.sqrt(var * (n / (n - 1)) + eps)
        v = torch.relu(gamma - std).mean()
    if covariance:
        cov = global_gram(z - mean, None, group, collective) / (n - 1)
        c = (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return v, c


def loss(z_a: torch.Tensor, z_b: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
         cov_coeff: float = 1.0, group: ProcessGroup | None = None, gamma: float = 1.0, eps: float = 1e-4,
         collective: str = "auto", std_term: str = "paper") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg loss (Eq. 6) over the global batch; returns (loss, {invariance, variance, covariance}).

    A term whose coefficient is 0 is neither computed nor reported. ``std_term="reference"`` halves the
    variance term as the reference implementation does (see the module docstring).
    """
    check_pair(z_a, z_b, "VICReg")
    check_weights({"sim_coeff": sim_coeff, "std_coeff": std_coeff, "cov_coeff": cov_coeff})
    if std_term not in STD_TERMS:
        raise ValueError(f"unknown VICReg std_term {std_term!r}; valid: {', '.join(STD_TERMS)}")
    parts: list[torch.Tensor] = []
    terms: dict[str, torch.Tensor] = {}
    with full_precision(z_a):
        z_a, z_b = as_loss_dtype(z_a), as_loss_dtype(z_b)
        if sim_coeff:
            sim = invariance(z_a, z_b, group)
            parts.append(sim_coeff * sim)
            terms["invariance"] = sim.detach()
        if std_coeff or cov_coeff:
            want_v, want_c = bool(std_coeff), bool(cov_coeff)
            v_a, c_a = variance_covariance(z_a, gamma, eps, group, collective, want_v, want_c)
            v_b, c_b = variance_covariance(z_b, gamma, eps, group, collective, want_v, want_c)
            if want_v:
                std_loss = v_a + v_b if std_term == "paper" else (v_a + v_b) / 2
                parts.append(std_coeff * std_loss)
                terms["variance"] = std_loss.detach()
            if want_c:
                cov_loss = c_a + c_b
                parts.append(cov_coeff * cov_loss)
                terms["covariance"] = cov_loss.detach()
        total = parts[0]
        for p in parts[1:]:
            total = total + p
    return total, terms


@METHODS.register("vicreg", config=VICRegConfig)
class VICReg(SSLMethod):
    """Backbone → expander → VICReg loss on two views."""

    cfg: VICRegConfig

    def objective(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 6 on the two views' embeddings."""
        c = self.cfg
        return loss(z[0], z[1], c.sim_coeff, c.std_coeff, c.cov_coeff, self.group, c.gamma, c.eps, c.collective,
                    c.std_term)
