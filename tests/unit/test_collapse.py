"""Collapse metrics on batches whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from largessl.metrics.collapse import collapse_metrics, effective_rank, uniformity


def _gauss(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_complete_collapse():
    z = torch.ones(64, 8, dtype=torch.float64) * torch.arange(1.0, 9.0, dtype=torch.float64)
    m = collapse_metrics(z, z_other=z.clone())
    assert m["std"] == pytest.approx(0.0, abs=1e-12)
    assert m["m_o"] == pytest.approx(1.0) and m["m_r"] == pytest.approx(0.0, abs=1e-12)
    assert m["rank"] == 1.0
    assert m["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert m["uniformity"] == pytest.approx(0.0, abs=1e-12)  # log E exp(0)


def test_dimensional_collapse_has_correlation_one_and_rank_one():
    t = _gauss(128, 1)
    z = torch.cat([t, -2 * t, 3 * t, t], dim=1)
    m = collapse_metrics(z)
    assert m["corr"] == pytest.approx(1.0)
    assert m["rank"] == 1.0
    assert m["rankme"] == pytest.approx(1.0, abs=1e-5)
    assert m["std"] > 0.5


def test_white_features_are_full_rank_and_decorrelated():
    q, _ = torch.linalg.qr(_gauss(256, 16))
    z = (q - q.mean(0)) * 16  # orthogonal centred columns of equal norm: all singular values equal
    m = collapse_metrics(z)
    assert m["rank"] == 16.0
    assert m["rankme"] == pytest.approx(16.0, rel=1e-2)
    assert m["corr"] < 0.01
    assert m["m_o"] < 0.2 and m["m_r"] > 0.9


def test_std_is_the_mean_per_dimension_std():
    z = _gauss(4096, 3) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert collapse_metrics(z)["std"] == pytest.approx(2.0, rel=0.05)


def test_rankme_and_uniformity_formulas():
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = s / s.sum() + 1e-7
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    z = _gauss(20, 5, seed=3)
    u = F.normalize(z, dim=1)
    pairs = [(i, j) for i in range(20) for j in range(i + 1, 20)]
    brute = math.log(sum(math.exp(-2 * float((u[i] - u[j]).pow(2).sum())) for i, j in pairs) / len(pairs))
    assert uniformity(z) == pytest.approx(brute)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        collapse_metrics(torch.zeros(3))
    with pytest.raises(ValueError, match="z_other must have the shape"):
        collapse_metrics(torch.zeros(4, 2), z_other=torch.zeros(4, 3))
