"""The collapse guard: stop a run whose embeddings have collapsed, instead of training it for the rest of the week.

Measured on what the collapse metrics watch (``train.collapse_every``: the embedding the method's loss compares,
over the global batch, the same numbers on every rank, so every rank decides alike without a collective):

- **complete collapse** — every input maps to (nearly) one point. Seed 004 (SimSiam, §3.1) defines it on the
  l2-normalised outputs z = o + r: the centre ``m_o = ||o||`` → 1 while the residual ``m_r`` → 0 (seed 000 Table 1
  reads the same as std → 0). Guard: ``m_o > 0.95``. Healthy runs sit far below: the demo's Barlow Twins reaches
  m_o 0.46, SimSiam's paper keeps it near 0 (the batch is spread over the sphere).
- **dimensional collapse** — the outputs span a handful of directions. Seed 000 (Shuffled-DBN, Fig. 4) shows it as a
  rank collapse with |corr| → 1; our small-scale repro of seed 004's collapsing variants reaches RankMe 1.6-1.9
  of 256 before m_o moves. Guard: ``RankMe < 2.5``, fewer than two and a half effective dimensions. Healthy
  runs have RankMe of tens to thousands (the demo: 97 of a 128-image batch).

Both are scale-free, so they serve every method: Barlow Twins and VICReg (unnormalised projector outputs), SimSiam
(z, or p for the symmetric predictor), BN/DBN/Shuffled-DBN (whitened outputs, where collapse appears as the rank
pattern) and the multi-view loss. VICReg adds a third, because its loss is not scale-free: its variance term holds
each dimension's std at γ = 1, and without it the embeddings shrink towards a point (std → 0, seed 000's complete
collapse) long before their directions bunch up. :data:`THRESHOLDS` holds the rules per method.

The guard waits for the end of the learning-rate warm-up (early embeddings of a healthy run can be narrow), then
trips only after ``train.collapse_guard_patience`` consecutive collapsed measurements (3 by default: with the
default ``collapse_every`` of 50 steps, 150 steps of evidence). It never trips on a missing or non-finite metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """When a measurement counts as collapsed."""

    m_o_above: float = 0.95
    """Complete collapse: the l2-normalised batch's mean has at least this norm (seed 004 §3.1)."""
    rankme_below: float = 2.5
    """Dimensional collapse: fewer effective dimensions (RankMe) than this (seed 000 Fig. 4)."""
    std_below: float | None = None
    """Collapse of scale, for losses that are not scale-free: the mean per-dimension std of the raw embeddings
    below this (None: not checked)."""


DEFAULT = Thresholds()
VICREG = Thresholds(std_below=0.05)
"""VICReg's variance term holds every dimension's std at γ = 1 (VICReg eq. 1); without it the invariance term
shrinks the embeddings towards one point (std → 0, the collapse the term exists to prevent). 0.05 is a twentieth of
the target: a healthy run climbs from its initial std towards γ, the invariance-only run falls through 0.05 in a
few hundred steps while its directions (m_o, RankMe) still look spread."""
THRESHOLDS: dict[str, Thresholds] = {"barlow_twins": DEFAULT, "vicreg": VICREG, "simsiam": DEFAULT,
                                     "decorrelation": DEFAULT, "multiview": DEFAULT}
"""Per method. Barlow Twins (a correlation of batch-standardised outputs), SimSiam (cosine), the BN/DBN heads
(standardised outputs) and the multi-view loss are scale-free, so only m_o and RankMe apply to them."""


def collapsed(metrics: dict[str, Any], t: Thresholds = DEFAULT) -> str:
    """Why one measurement (``collapse/*`` keys of a metrics record) is collapsed, or '' when it is not."""
    m_o, rankme, std = metrics.get("collapse/m_o"), metrics.get("collapse/rankme"), metrics.get("collapse/std")
    why = []
    if isinstance(m_o, (int, float)) and math.isfinite(m_o) and m_o > t.m_o_above:
        why.append(f"complete collapse: m_o {m_o:.3f} > {t.m_o_above}")
    if isinstance(rankme, (int, float)) and math.isfinite(rankme) and rankme < t.rankme_below:
        why.append(f"dimensional collapse: RankMe {rankme:.2f} < {t.rankme_below}")
    if t.std_below is not None and isinstance(std, (int, float)) and math.isfinite(std) and std < t.std_below:
        why.append(f"collapse of scale: std {std:.4f} < {t.std_below}")
    return "; ".join(why)


class CollapseGuard:
    """Counts consecutive collapsed measurements after ``warmup_steps``; :meth:`observe` says when to stop."""

    def __init__(self, method: str, patience: int, warmup_steps: int) -> None:
        self.thresholds = THRESHOLDS.get(method, DEFAULT)
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.streak = 0
        self.first_step: int | None = None

    def observe(self, step: int, metrics: dict[str, Any]) -> str:
        """Feed one measurement; returns the reason to stop (after ``patience`` collapsed ones in a row) or ''."""
        if step <= self.warmup_steps:
            return ""
        why = collapsed(metrics, self.thresholds)
        if not why:
            self.streak, self.first_step = 0, None
            return ""
        self.streak += 1
        if self.first_step is None:
            self.first_step = step
        if self.streak < self.patience:
            return ""
        return (f"collapsed: {why} on {self.streak} consecutive measurements (steps {self.first_step}-{step}); "
                "stopped by train.collapse_guard (set it false to train on)")
