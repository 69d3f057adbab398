"""The hub's static index.html: one table row per published version, loss curves as inline SVG.

Self-contained (no scripts, no external assets), so it reads in any browser straight from a bucket
or a directory. Rendered only from ``index.json`` summaries, so a push never reads other models' cards.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem;color:#1b1f24;background:#fff}
h1{font-size:1.5rem;margin:0 0 .25rem} p.sub{color:#57606a;margin:0 0 1.25rem}
table{border-collapse:collapse;font-size:.9rem} th,td{border:1px solid #d0d7de;padding:.4rem .6rem;vertical-align:middle}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px;font-size:.85em}
.latest{background:#ddf4ff;color:#0969da;border-radius:8px;padding:0 .4rem;font-size:.75rem;margin-left:.3rem}
.muted{color:#57606a} .nw{white-space:nowrap}
"""


def loss_curve_svg(points: Sequence[Sequence[float]], width: int = 220, height: int = 64) -> str:
    """An inline SVG line chart of (step, loss) points, with min/max loss labels; empty input → a dash."""
    pts = [(float(s), float(v)) for s, v in points if math.isfinite(float(v))]
    if len(pts) < 2:
        return '<span class="muted">–</span>'
    pad = 4
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xr = (x1 - x0) or 1.0
    yr = (y1 - y0) or 1.0
    coords = " ".join(
        f"{pad + (x - x0) / xr * (width - 2 * pad):.1f},{pad + (1 - (y - y0) / yr) * (height - 2 * pad):.1f}"
        for x, y in pts
    )
    label = f"loss {ys[0]:.4g} → {ys[-1]:.4g} over {int(x1)} steps"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(label)}">'
        f"<title>{html.escape(label)}</title>"
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f6f8fa"/>'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{coords}"/>'
        f'<text x="{width - pad}" y="12" font-size="9" text-anchor="end" fill="#57606a">{y1:.3g}</text>'
        f'<text x="{width - pad}" y="{height - pad}" font-size="9" text-anchor="end" fill="#57606a">{y0:.3g}</text>'
        "</svg>"
    )


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "–"


def _knn(metrics: Mapping[str, Any]) -> str:
    knn = metrics.get("knn_top1") or {}
    if not isinstance(knn, Mapping) or not knn:
        return "–"
    return " / ".join(f"{_num(v)} <span class=muted>k={html.escape(str(k))}</span>"
                      for k, v in sorted(knn.items(), key=lambda kv: int(kv[0])))


def _collapse(metrics: Mapping[str, Any]) -> str:
    col = metrics.get("collapse") or {}
    if not isinstance(col, Mapping) or not col:
        return "–"
    return "<br>".join(f"{html.escape(str(k))} {_num(v, 3)}" for k, v in sorted(col.items())[:6])


def render_index_html(index: Mapping[str, Any], hub_url: str = "") -> str:
    """The whole index.html for a hub index (see :mod:`largessl.hub.store` for its format)."""
    rows = []
    models = index.get("models", {})
    for name in sorted(models):
        entry = models[name]
        versions = sorted(entry["versions"].items(), key=lambda kv: kv[1].get("created", ""), reverse=True)
        for version, v in versions:
            s = v.get("summary", {})
            m = s.get("metrics", {})
            badge = '<span class="latest">latest</span>' if version == entry.get("latest") else ""
            rows.append(
                "<tr>"
                f"<td class=nw><b>{html.escape(name)}</b></td>"
                f"<td><code>{html.escape(version)}</code>{badge}</td>"
                f"<td>{html.escape(str(s.get('method') or '–'))}</td>"
                f"<td>{html.escape(str(s.get('arch') or '–'))}</td>"
                f"<td>{html.escape(str(s.get('dataset') or '–'))}</td>"
                f"<td class=num>{_num(s.get('epochs'), 1)}</td>"
                f"<td class=num>{_num(m.get('linear_top1'))}</td>"
                f"<td class=num>{_knn(m)}</td>"
                f"<td class=num>{_collapse(m)}</td>"
                f"<td>{loss_curve_svg(s.get('loss_curve', []))}</td>"
                f"<td class=muted>{html.escape(v.get('created', ''))}<br>"
                f"<code>{html.escape(str(s.get('git_revision', ''))[:10])}</code></td>"
                f"<td><code>largessl.hub.load_backbone(&quot;{html.escape(name)}@{html.escape(version)}&quot;, "
                f"hub=&quot;{html.escape(hub_url)}&quot;)</code></td>"
                "</tr>"
            )
    body = "\n".join(rows) if rows else '<tr><td colspan="12" class="muted">No models published yet.</td></tr>'
    count = sum(len(e["versions"]) for e in models.values())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>largessl model hub</title>
<style>{_CSS}</style>
</head>
<body>
<h1>largessl model hub</h1>
<p class="sub">{html.escape(hub_url)} · {len(models)} models, {count} versions · accuracies in % on the validation split ·
weights: <code>models/NAME/VERSION/backbone.safetensors</code>, provenance: <code>model_card.json</code></p>
<table>
<thead><tr><th>model</th><th>version</th><th>method</th><th>backbone</th><th>dataset</th><th>epochs</th>
<th>linear top-1</th><th>kNN top-1</th><th>collapse metrics</th><th>training loss</th><th>created / git</th><th>load</th></tr></thead>
<tbody>
{body}
</tbody>
</table>
</body>
</html>
"""
