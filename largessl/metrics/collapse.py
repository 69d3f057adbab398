"""Collapse indicators of a batch of embeddings, over the global batch of all ranks.

- ``std``: mean over dimensions of the per-dimension std (seed 000 Table 1; complete collapse → 0);
  ``std_l2``: the same on l2-normalised rows (SimSiam's indicator, ≈ 1/√D when healthy).
- ``corr``: mean over i ≠ j of |correlation_ij| of the standardised features (seed 000 eq. 1;
  dimensional collapse → 1).
- ``rank``: singular values of Z above max(N, D)·ε_fp32·σ_max (seed 000 Fig. 4; numpy's matrix_rank
  tolerance at the fp32 precision embeddings are trained in);
  ``rankme``: exp of the entropy of the normalised singular values (RankMe, Garrido et al. 2023).
- ``m_o`` / ``m_r``: on l2-normalised z = o + r with o the batch mean, m_o = ||o||, m_r = mean ||r_i||
  (seed 004 §3.1; collapse → m_o → 1, m_r → 0).
- ``alignment`` (eq. 2) and ``uniformity`` (eq. 3, t = 2) on l2-normalised features, when a second view is given.

All of it runs on every rank after one ``all_gather_no_grad`` per input (a sync point), so call it on
log steps only. Costs: one min(N, D)² eigendecomposition, a D² correlation matrix, an N² distance matrix
(over at most ``max_pairs_samples`` rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_gather_no_grad

RANKME_EPS = 1e-7
"""Added to the normalised singular values before the entropy (RankMe's ε)."""


def singular_values(z: torch.Tensor) -> torch.Tensor:
    """Singular values of z (N, D), descending, via the eigenvalues of the smaller Gram matrix in fp64.

    fp64 because the Gram route squares the condition number: it resolves singular values down to
    √ε_fp64·σ_max ≈ 1.5e-8·σ_max, well below the rank tolerance.
    """
    z = z.double()
    gram = z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def effective_rank(s: torch.Tensor) -> float:
    """RankMe: exp(−Σ p_k log p_k) with p = s / Σ s + ε."""
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + RANKME_EPS
    return float(torch.exp(-(p * torch.log(p)).sum()))


def numerical_rank(s: torch.Tensor, n: int, d: int) -> int:
    """Number of singular values above max(n, d)·ε_fp32·σ_max (numpy's tolerance at training precision)."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = max(n, d) * torch.finfo(torch.float32).eps * s[0]
    return int((s > tol).sum())


def mean_abs_correlation(z: torch.Tensor) -> float:
    """Mean over i ≠ j of |corr(z_i, z_j)| (seed 000 eq. 1 on standardised features); dead dims count as 0."""
    d = z.shape[1]
    if d < 2:
        return 0.0
    zc = z - z.mean(0)
    std = zc.pow(2).mean(0).sqrt()
    zs = zc / torch.where(std > 0, std, torch.ones_like(std))
    corr = zs.T @ zs / z.shape[0]
    off = corr.abs().sum() - torch.diagonal(corr).abs().sum()
    return float(off / (d * (d - 1)))


def center_residual(z: torch.Tensor) -> tuple[float, float]:
    """(m_o, m_r) of seed 004 §3.1 on l2-normalised rows."""
    u = F.normalize(z, dim=1)
    o = u.mean(0)
    return float(o.norm()), float((u - o).norm(dim=1).mean())


def alignment(z: torch.Tensor, z_other: torch.Tensor) -> float:
    """E ||f(x) − f(y)||² over positive pairs, on l2-normalised features (seed 000 eq. 2)."""
    return float((F.normalize(z, dim=1) - F.normalize(z_other, dim=1)).pow(2).sum(1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(−t ||f(x) − f(y)||²) over distinct pairs, on l2-normalised features (seed 000 eq. 3)."""
    n = z.shape[0]
    if n < 2:
        return float("nan")
    sq = torch.pdist(F.normalize(z, dim=1)).pow(2)
    # logsumexp − log(count): stable even when every pair is far apart.
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def collapse_metrics(z: torch.Tensor, group: ProcessGroup | None = None, z_other: torch.Tensor | None = None,
                     max_pairs_samples: int = 4096) -> dict[str, float]:
    """Collapse indicators of embeddings ``z`` (N_local, D) over the global batch (see the module docstring).

    ``z_other`` (the other view of the same images) adds alignment and uniformity; the pairwise terms use
    the first ``max_pairs_samples`` gathered rows to keep the N² distance matrix bounded.
    """
    if z.dim() != 2:
        raise ValueError(f"collapse_metrics expects (N, D) embeddings, got {tuple(z.shape)}")
    if z_other is not None and z_other.shape != z.shape:
        raise ValueError(f"z_other must have the shape of z {tuple(z.shape)}, got {tuple(z_other.shape)}")
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        zg = all_gather_no_grad(z.detach(), group)
        zg = zg.double() if zg.dtype == torch.float64 else zg.float()
        n, d = zg.shape
        s = singular_values(zg)
        m_o, m_r = center_residual(zg)
        out = {
            "std": float(zg.std(0, unbiased=n > 1).mean()),
            "std_l2": float(F.normalize(zg, dim=1).std(0, unbiased=n > 1).mean()),
            "corr": mean_abs_correlation(zg),
            "rank": float(numerical_rank(s, n, d)),
            "rankme": effective_rank(s),
            "m_o": m_o,
            "m_r": m_r,
        }
        if z_other is not None:
            og = all_gather_no_grad(z_other.detach(), group).to(zg.dtype)
            out["alignment"] = alignment(zg, og)
            out["uniformity"] = uniformity(zg[:max_pairs_samples])
    return out
