"""The hub's static pages: ``index.html`` (one tile per model) and ``pages/<name>.html`` (one page per model).

Self-contained HTML (inline CSS, inline SVG loss curves, no scripts, no external assets) with relative
links, so the pages work straight from a bucket, a web server or a directory. Layout is fluid (max
1,180 px wide; long hashes and code wrap), so nothing scrolls sideways at 1,280 px or on a phone.
The index is rendered from ``index.json`` summaries alone; a model page also reads that model's cards.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from largessl.hub.records import PAGES_DIR, latest_version, version_order

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1b1f24;background:#fff;
line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.2rem 0 .3rem} h2{font-size:1.2rem;margin:2rem 0 .6rem;padding-bottom:.3rem;
border-bottom:1px solid #d8dee4} h3{font-size:1rem;margin:1.2rem 0 .4rem}
a{color:#0969da} p.sub{color:#57606a;margin:0 0 1rem} .muted{color:#57606a}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1rem}
.tile{border:1px solid #d0d7de;border-radius:10px;padding:.9rem 1rem;min-width:0}
.tile h2{border:0;margin:0 0 .2rem;padding:0;font-size:1.15rem;overflow-wrap:anywhere}
.facts{display:grid;grid-template-columns:minmax(9rem,max-content) minmax(0,1fr);gap:.25rem .9rem;margin:.5rem 0}
.facts dt{color:#57606a} .facts dd{margin:0;min-width:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;table-layout:fixed;font-size:.9rem;margin:.4rem 0}
th,td{border:1px solid #d0d7de;padding:.35rem .5rem;vertical-align:top;text-align:left;overflow-wrap:anywhere}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f6f8fa;padding:.05rem .3rem;border-radius:4px;font-size:.85em;overflow-wrap:anywhere}
pre{background:#f6f8fa;border:1px solid #d8dee4;border-radius:6px;padding:.6rem .75rem;margin:.3rem 0 .8rem;
white-space:pre-wrap;overflow-wrap:anywhere;font-size:.82rem}
pre code{background:none;padding:0}
svg{max-width:100%;height:auto;display:block}
.badge{display:inline-block;border-radius:999px;padding:0 .5rem;font-size:.75rem;margin-left:.35rem;
vertical-align:middle;white-space:nowrap}
.latest{background:#ddf4ff;color:#0969da} .yanked{background:#ffebe9;color:#cf222e}
details{border:1px solid #d0d7de;border-radius:8px;padding:.5rem .9rem;margin:.6rem 0}
details[open]{padding-bottom:.9rem} summary{cursor:pointer;font-weight:600;overflow-wrap:anywhere}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.5rem .75rem}
"""


SNIPPET_ORDER = ("largessl", "torch.hub", "torchvision", "timm", "hf", "detectron2")


def model_page_name(name: str) -> str:
    """File name of a model's page inside ``pages/`` (names are already restricted to URL-safe characters)."""
    return f"{name}.html"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "–"


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
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">'
        f"<title>{_e(label)}</title>"
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f6f8fa"/>'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{coords}"/>'
        f'<text x="{width - pad}" y="12" font-size="9" text-anchor="end" fill="#57606a">{y1:.3g}</text>'
        f'<text x="{width - pad}" y="{height - pad}" font-size="9" text-anchor="end" fill="#57606a">{y0:.3g}</text>'
        f'<text x="{pad}" y="{height - pad}" font-size="9" fill="#57606a">step {int(x0)}–{int(x1)}</text>'
        "</svg>"
    )


def _knn(metrics: Mapping[str, Any]) -> str:
    knn = metrics.get("knn_top1") or {}
    if not isinstance(knn, Mapping) or not knn:
        return "–"
    return " / ".join(f"{_num(v)} <span class=muted>k={_e(k)}</span>"
                      for k, v in sorted(knn.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0))


def _eval_cells(metrics: Mapping[str, Any]) -> tuple[str, str, str]:
    """(linear, kNN, fine-tune) cells of a metrics block."""
    ft = [f"{_num(v)} <span class=muted>{_e(k.removeprefix('finetune_').removesuffix('_top1'))}</span>"
          for k, v in sorted(metrics.items()) if k.startswith("finetune") and k.endswith("_top1")]
    return _num(metrics.get("linear_top1")), _knn(metrics), " / ".join(ft) or "–"


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""


def _badges(version: str, entry: Mapping[str, Any], latest: str | None) -> str:
    out = ""
    if version == latest:
        out += '<span class="badge latest">latest</span>'
    if entry.get("yanked"):
        out += f'<span class="badge yanked" title="{_e(entry["yanked"].get("reason", ""))}">yanked</span>'
    return out


def render_index_html(index: Mapping[str, Any], hub_url: str = "") -> str:
    """index.html: one tile per model linking to its page (see :mod:`largessl.hub.store` for the index)."""
    models = index.get("models", {})
    tiles = []
    for name in sorted(models):
        model = models[name]
        versions = model.get("versions", {})
        latest = latest_version(model)
        shown = latest or max(versions, key=lambda v: version_order(versions[v]))
        entry = versions[shown]
        s = entry.get("summary", {})
        m = s.get("metrics", {})
        lin, knn, ft = _eval_cells(m)
        yanked = sum(1 for e in versions.values() if e.get("yanked"))
        link = f"{PAGES_DIR}/{model_page_name(name)}"
        tiles.append(
            f'<section class="tile"><h2><a href="{_e(link)}">{_e(name)}</a></h2>'
            f'<div><code>{_e(shown)}</code>{_badges(shown, entry, latest)}'
            f' <span class="muted">· {len(versions)} version{"s" if len(versions) != 1 else ""}'
            f'{f", {yanked} yanked" if yanked else ""}</span></div>'
            '<dl class="facts">'
            f"<dt>method</dt><dd>{_e(s.get('method') or '–')}</dd>"
            f"<dt>backbone</dt><dd>{_e(s.get('arch') or '–')}</dd>"
            f"<dt>data set</dt><dd>{_e(s.get('dataset') or '–')}</dd>"
            f"<dt>epochs</dt><dd>{_num(s.get('epochs'))}</dd>"
            f"<dt>linear top-1</dt><dd>{lin}</dd><dt>kNN top-1</dt><dd>{knn}</dd>"
            f"<dt>fine-tune top-1</dt><dd>{ft}</dd>"
            f"<dt>license</dt><dd>{_e(s.get('license') or 'unspecified')}</dd>"
            f"<dt>created</dt><dd>{_e(entry.get('created', ''))}</dd></dl>"
            f"{loss_curve_svg(s.get('loss_curve', []), width=300, height=70)}"
            f'<p><a href="{_e(link)}">versions, card and load snippets →</a></p></section>'
        )
    count = sum(len(e.get("versions", {})) for e in models.values())
    body = (f"<h1>largessl model hub</h1>\n<p class=\"sub\">{_e(hub_url)} · {len(models)} models, {count} versions · "
            "accuracies in % on the validation split · every file is sha256-verified by "
            "<code>largessl hub pull</code></p>\n"
            + (f'<div class="grid">\n{chr(10).join(tiles)}\n</div>' if tiles
               else '<p class="muted">No models published yet.</p>'))
    return _page("largessl model hub", body)


# ---------------------------------------------------------------------------------------------------
# Model pages


def _facts(card: Mapping[str, Any]) -> str:
    ds = card.get("dataset", {}) or {}
    paper = card.get("paper", {}) or {}
    arch = card.get("architecture", {}) or {}
    cite = _e(paper.get("citation") or "–")
    if paper.get("url"):
        cite = f'<a href="{_e(paper["url"])}">{cite}</a>'
    data = _e(ds.get("name") or "unknown") + (f" <span class=muted>({_e(ds['split'])} split)</span>"
                                              if ds.get("split") else "")
    if ds.get("num_samples"):
        n_cls = int(ds.get("num_classes", 0) or 0)
        data += f" · {ds['num_samples']:,} images, {n_cls} class{'es' if n_cls != 1 else ''}"
    skips = card.get("data_skips") or {}
    collapse = (card.get("metrics", {}) or {}).get("collapse") or {}
    rows = [
        ("method", f"{_e(card.get('method', '?'))}"),
        ("paper", cite),
        ("data set", data),
        ("manifest", f"<code>{_e(ds.get('manifest_url') or '–')}</code>"),
        ("manifest id", f"<code>{_e(ds.get('manifest_id') or '–')}</code>"),
        ("manifest sha256", f"<code>{_e(ds.get('manifest_sha256') or '–')}</code>"),
        ("backbone", f"{_e(arch.get('arch', '?'))}{' (small input)' if arch.get('small_input') else ''}, "
                     f"{_e(arch.get('num_features', '?'))} features"),
        ("trained", f"{_num(card.get('epochs'))} epochs, {_e(card.get('step', '?'))} steps"),
        ("skipped data", ", ".join(f"{_e(k.replace('_', ' '))}: {v}" for k, v in skips.items()) or "none recorded"),
        ("collapse metrics", ", ".join(f"{_e(k)} {_num(v, 3)}" for k, v in sorted(collapse.items())) or "–"),
        ("final loss", _num((card.get("metrics", {}) or {}).get("final_loss"), 4)),
        ("git revision", f"<code>{_e(card.get('git_revision', 'unknown'))}</code>"),
        ("license", _e(card.get("license", "unspecified"))),
        ("created", _e(card.get("created", ""))),
        ("backbone sha256", f"<code>{_e(card.get('files', {}).get('backbone.safetensors', {}).get('sha256', '–'))}</code>"),
    ]
    if ds.get("note"):
        rows.insert(3, ("data set note", _e(ds["note"])))
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _evaluation(card: Mapping[str, Any]) -> str:
    evals = card.get("evaluation") or {}
    if not evals:
        return '<p class="muted">No evaluation results were recorded for this version.</p>'
    rows = []
    for stage, ev in sorted(evals.items()):
        res = ev.get("result", ev) if isinstance(ev, Mapping) else {}
        top1 = res.get("top1")
        t1 = (" / ".join(f"{_num(v)} <span class=muted>k={_e(k)}</span>" for k, v in top1.items())
              if isinstance(top1, Mapping) else _num(top1))
        rows.append(f"<tr><td>{_e(stage)}</td><td class=num>{t1}</td><td class=num>{_num(res.get('top5'))}</td>"
                    f"<td>{_e(ev.get('protocol', '') if isinstance(ev, Mapping) else '')}</td></tr>")
    return ('<table><colgroup><col style="width:16%"><col style="width:18%"><col style="width:10%"><col></colgroup>'
            "<tr><th>evaluation</th><th>top-1 %</th><th>top-5 %</th><th>protocol</th></tr>"
            + "".join(rows) + "</table>")


def _differences(card: Mapping[str, Any]) -> str:
    paper = card.get("paper", {}) or {}
    diffs = paper.get("differences")
    recipe = paper.get("recipe")
    if diffs is None:
        return f'<p class="muted">{_e(paper.get("note") or "No paper recipe to compare with.")}</p>'
    if not diffs:
        return f"<p>Same recipe as the paper's (<code>{_e(recipe)}</code>).</p>"
    rows = "".join(f"<tr><td><code>{_e(d['key'])}</code></td><td>{_e(json.dumps(d['paper']))}</td>"
                   f"<td>{_e(json.dumps(d['run']))}</td></tr>" for d in diffs)
    return (f"<p>{len(diffs)} setting{'s' if len(diffs) != 1 else ''} differ from the paper's recipe "
            f"<code>{_e(recipe)}</code>:</p><table><tr><th>setting</th><th>paper</th><th>this run</th></tr>"
            f"{rows}</table>")


def _snippets(card: Mapping[str, Any]) -> str:
    snippets = card.get("snippets") or {}
    if not snippets:
        return '<p class="muted">This version was published without load snippets.</p>'
    order = {k: i for i, k in enumerate(SNIPPET_ORDER)}  # cards store them sorted by name; show the common first
    return "".join(f"<h3>{_e(fmt)}</h3><pre><code>{_e(code)}</code></pre>"
                   for fmt, code in sorted(snippets.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))


def _version_section(name: str, version: str, entry: Mapping[str, Any], card: Mapping[str, Any] | str,
                     latest: str | None, open_: bool) -> str:
    head = (f'<summary><code>{_e(version)}</code>{_badges(version, entry, latest)} '
            f'<span class="muted">{_e(entry.get("created", ""))}</span></summary>')
    parts = []
    if entry.get("yanked"):
        y = entry["yanked"]
        parts.append(f'<p class="warn"><b>Yanked</b> on {_e(y.get("at", "?"))}: {_e(y.get("reason", ""))}. '
                     "Kept for reproducibility; <code>latest</code> skips it and pulls refuse it without "
                     "<code>--allow-yanked</code>.</p>")
    if isinstance(card, str):
        parts.append(f'<p class="warn">The model card of this version failed verification: {_e(card)}</p>')
    else:
        parts += ["<h3>Card</h3>", _facts(card),
                  "<h3>Evaluation</h3>", _evaluation(card),
                  "<h3>Training loss</h3>", loss_curve_svg(card.get("loss_curve", []), width=720, height=160),
                  "<h3>Differences from the paper's recipe</h3>", _differences(card),
                  "<h3>Load it</h3>", _snippets(card)]
    return (f'<details id="v-{_e(version)}"{" open" if open_ else ""}>{head}' + "\n".join(parts) + "</details>")


def render_model_page(name: str, model: Mapping[str, Any], cards: Mapping[str, Mapping[str, Any] | str],
                      hub_url: str = "") -> str:
    """``pages/<name>.html``: every version with metrics and loss curve, then each version's card and snippets."""
    versions = sorted(model.get("versions", {}).items(), key=lambda kv: version_order(kv[1]), reverse=True)
    latest = latest_version(model)
    rows = []
    for version, entry in versions:
        m = entry.get("summary", {}).get("metrics", {})
        lin, knn, ft = _eval_cells(m)
        rows.append(f'<tr><td><a href="#v-{_e(version)}"><code>{_e(version)}</code></a>'
                    f"{_badges(version, entry, latest)}</td><td>{_e(entry.get('created', ''))}</td>"
                    f"<td class=num>{lin}</td><td class=num>{knn}</td><td class=num>{ft}</td>"
                    f"<td>{loss_curve_svg(entry.get('summary', {}).get('loss_curve', []), width=200, height=50)}</td></tr>")
    table = ('<table><colgroup><col style="width:17%"><col style="width:15%"><col style="width:10%">'
             '<col style="width:17%"><col style="width:14%"><col></colgroup>'
             "<tr><th>version</th><th>created</th><th>linear top-1</th><th>kNN top-1</th><th>fine-tune top-1</th>"
             "<th>training loss</th></tr>" + "".join(rows) + "</table>")
    sections = [_version_section(name, v, e, cards.get(v, "card not read"), latest, open_=(v == latest))
                for v, e in versions]
    status = (f"latest <code>{_e(latest)}</code>" if latest else
              '<span class="badge yanked">every version is yanked</span>')
    body = (f'<p><a href="../index.html">← all models</a></p>\n<h1>{_e(name)}</h1>\n'
            f'<p class="sub">{_e(hub_url)} · {status} · {len(versions)} version{"s" if len(versions) != 1 else ""} · '
            "accuracies in % on the validation split</p>\n"
            f"<h2>Versions</h2>\n{table}\n<h2>Version details</h2>\n" + "\n".join(sections))
    return _page(f"{name} · largessl model hub", body)
