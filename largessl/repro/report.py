"""The printed form of a repro result: the paper's numbers beside ours, a verdict per row, the thresholds."""

from __future__ import annotations

from typing import Any

from largessl.repro.tables import THRESHOLDS, Table, siam_collapse

SUBSTITUTIONS = ("small scale: 1437 train / 360 held-out sklearn digits at 16 px (not CIFAR), a 3-conv backbone "
                 "(not ResNet-18), a few hundred SGD steps (not 200-1000 epochs); our accuracy is weighted kNN "
                 "(k=20) on backbone features, the paper's is a linear probe unless noted; std/corr/rank/m_o/m_r "
                 "are measured on the 360 held-out projections as one batch (batch statistics); for the SimSiam family on "
                 "the output the loss compares: z, or p for the symmetric predictor.")


def cell(metrics: dict[str, float], key: str) -> str:
    """One measured value as printed."""
    if key == "collapse":
        return siam_collapse(metrics)
    v = metrics.get(key)
    if v is None:
        return "-"
    if key in ("knn", "knn200"):
        return f"{v:.2f}"
    if key in ("rank", "dim"):
        return f"{v:.0f}"
    if key == "rankme":
        return f"{v:.1f}"
    if key == "loss":
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.3f}" if abs(v) < 0.1 and key in ("std", "std_l2") else f"{v:.2f}"


def format_table(table: Table, result: dict[str, Any]) -> str:
    """The table as text: paper columns | our columns | steps | verdict, then the evidence per row."""
    rows = result["rows"]
    header = ["variant", *[f"paper {h}" for _, h in table.paper_columns], *[h for _, h in table.columns],
              "steps", "verdict"]
    body = []
    for r in rows:
        steps = f"{r['steps_done']}/{r['steps_planned']}" + ("*" if r["stopped_early"] else "")
        body.append([r["name"], *[r["paper"].get(k, "-") for k, _ in table.paper_columns],
                     *[cell(r["metrics"], k) for k, _ in table.columns], steps,
                     "reproduced" if r["verdict"]["reproduced"] else "NOT reproduced"])
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    np_ = len(table.paper_columns)

    def line(cells: list[str]) -> str:
        parts = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts[:1 + np_]) + "  |  " + "  ".join(parts[1 + np_:])

    out = [f"{table.name}: {table.title}", f"source: {table.source}", "", line(header),
           "-" * len(line(header))]
    out += [line(b) for b in body]
    out.append("")
    for r in rows:
        v = r["verdict"]
        state = "REPRODUCED" if v["reproduced"] else "NOT REPRODUCED"
        out.append(f"{r['name']}: {state}: claim: {v['claim']}; evidence: {v['evidence']}")
    if any(r["stopped_early"] for r in rows):
        out.append("* the time budget stopped this variant before its planned steps; rerun the same command "
                   "(same --out) to continue it, or raise --minutes")
    out.append("")
    out.append(f"paper setup: {table.notes}")
    out.append(f"ours: {SUBSTITUTIONS}")
    out.append("thresholds: " + ", ".join(f"{k}={v}" for k, v in THRESHOLDS.items())
               + " (see largessl/repro/tables.py)")
    n_ok = sum(r["verdict"]["reproduced"] for r in rows)
    out.append(f"{n_ok}/{len(rows)} rows reproduced; training + evaluation took {result['minutes']:.1f} min")
    return "\n".join(out)


def format_list(tables: dict[str, Table]) -> str:
    """``largessl repro --list``: one line per table with its default length."""
    width = max(len(n) for n in tables)
    lines = [f"{n.ljust(width)}  {t.title} [{t.source}; {len(t.variants)} variants x {t.num_steps} steps, "
             f"default --minutes {t.minutes:g}]" for n, t in tables.items()]
    return "\n".join(lines)
