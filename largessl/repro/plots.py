"""The PNG of a repro table: one panel per training curve (a line per variant and seed, one colour per
variant), plus the 2-D projection space of every variant (seed 0) when the table has one (seed 000 Figure 2)."""

from __future__ import annotations

import os
from typing import Any

from largessl.run.durable import save_png

CURVE_TITLES = {
    "loss": "training loss",
    "collapse/std": "std (per-dim, projection)",
    "collapse/std_l2": "std of l2-normalised z",
    "collapse/corr": "corr (mean |off-diag|)",
    "collapse/rank": "numerical rank",
    "collapse/rankme": "RankMe (effective rank)",
    "collapse/m_o": "m_o (centre ratio)",
    "collapse/m_r": "m_r (residual ratio)",
}


def plot_table(result: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Write the curves (and scatter plots) of a table ``result`` (as saved in its JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    rows = result["rows"]
    curves = list(result["curves"])
    scatter = [r for r in rows if r.get("points")]
    ncols = max(len(curves), len(scatter), 1)
    nrows = 2 if scatter else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, key in zip(axes[0], curves):
        for i, r in enumerate(rows):
            for s, seed_curves in enumerate(r.get("seed_curves") or [r["curves"]]):  # one line per seed
                pts = seed_curves.get(key, [])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours(i % 10), alpha=0.8 if s == 0 else 0.4,
                            label=r["name"] if s == 0 else None)
        ax.set_title(CURVE_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        if key in ("loss", "collapse/std") and any(p[1] > 0 for r in rows for p in r["curves"].get(key, [])):
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    for ax in axes[0][len(curves):]:
        ax.axis("off")
    if scatter:
        for ax, r in zip(axes[1], scatter):
            xs, ys = [p[0] for p in r["points"]], [p[1] for p in r["points"]]
            ax.scatter(xs, ys, c=[colours(y % 10) for y in r["labels"]], s=6, alpha=0.7)
            ax.set_title(f"{r['name']}: held-out 2-D projections (seed 0)", fontsize=10)
            ax.set_aspect("equal", adjustable="datalim")
        for ax in axes[1][len(scatter):]:
            ax.axis("off")
    fig.suptitle(f"{result['name']}: {result['title']}", fontsize=11)
    return save_png(fig, path)
