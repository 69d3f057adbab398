"""The printed form of a repro result: the paper's numbers beside ours (mean ± std over the seeds), a verdict
per row, the rules and thresholds."""

from __future__ import annotations

from typing import Any

from largessl.repro.tables import (
    MIN_EFFECT,
    NOT_REPRODUCED,
    REPRODUCED,
    THRESHOLDS,
    UNRESOLVED,
    Table,
    siam_collapse,
)

DATA_TEXT = {
    "digits": "1437 train / 360 held-out sklearn digits at {px} px",
    "photodigits": "1438 train / 359 held-out photodigits at {px} px (digits over photographs; train and held-out "
                   "split by glyph and by photograph)",
}
SUBSTITUTIONS = ("small scale: {data} (not CIFAR), {backbone}, a few hundred SGD steps (not 200-1000 epochs); our "
                 "accuracy is weighted kNN (k=20) on backbone features, the paper's is a linear probe unless noted; "
                 "std/corr/rank/m_o/m_r are measured on the held-out projections as one batch (batch statistics); for "
                 "the SimSiam family on the output the loss compares: z, or p for the symmetric predictor.")
LEGACY_BACKBONE = "a 3-conv backbone at 16 px (not ResNet-18)"
"""What a results.json written before ``--backbone`` ran on."""
RULES = ("verdicts: collapse thresholds must hold on every seed; an effect claim (direction and minimum effect, "
         "e.g. 'kNN A − B ≥ 3 points', 'kNN ≤ 2× chance') is judged on the 95% t-interval over the seeds, of the "
         "per-seed differences when two variants are compared (paired by seed): reproduced when the interval lies "
         "beyond the minimum effect, NOT reproduced when it excludes the claimed effect, unresolved otherwise (and "
         "always on one seed); values are mean ± sample std over the seeds")


def _value(v: float, key: str) -> str:
    if key in ("knn", "knn200"):
        return f"{v:.2f}"
    if key in ("rank", "dim"):
        return f"{v:.0f}"
    if key == "rankme":
        return f"{v:.1f}"
    if key == "loss":
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.3f}" if abs(v) < 0.1 and key in ("std", "std_l2") else f"{v:.2f}"


def cell(row: dict[str, Any], key: str) -> str:
    """One measured column of a row as printed: mean ± std over its seeds (the value alone for one seed)."""
    runs = [s["metrics"] for s in row.get("seeds", [])] or [row["metrics"]]
    if key == "collapse":
        kinds = [siam_collapse(m) for m in runs]
        return kinds[0] if len(set(kinds)) == 1 else "/".join(kinds)
    v = row["metrics"].get(key)
    if v is None:
        return "-"
    sd = row.get("metrics_std", {}).get(key)
    if len(runs) < 2 or sd is None:
        return _value(v, key)
    return f"{_value(v, key)} ± {_value(sd, key)}"


def format_table(table: Table, result: dict[str, Any]) -> str:
    """The table as text: paper columns | our columns | steps | verdict, then the evidence per row."""
    rows = result["rows"]
    seeds = result.get("seeds", 1)
    header = ["variant", *[f"paper {h}" for _, h in table.paper_columns], *[h for _, h in table.columns],
              "steps", "verdict"]
    body = []
    for r in rows:
        steps = f"{r['steps_done']}/{r['steps_planned']}" + ("*" if r["stopped_early"] else "")
        body.append([r["name"], *[r["paper"].get(k, "-") for k, _ in table.paper_columns],
                     *[cell(r, k) for k, _ in table.columns], steps, r["verdict"]["state"]])
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    np_ = len(table.paper_columns)

    def line(cells: list[str]) -> str:
        parts = [str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts[:1 + np_]) + "  |  " + "  ".join(parts[1 + np_:])

    out = [f"{table.name}: {table.title}", f"source: {table.source}",
           f"data: {result.get('dataset', 'digits')}; seeds: {seeds} (train.seed 0-{seeds - 1}), "
           f"{result.get('num_steps', rows[0]['steps_planned'])} steps each; backbone: "
           f"{result.get('backbone', 'convnet')}"]
    rand = result.get("random_init_knn")
    if rand:
        out.append("random init (torchvision's, each seed; no training): kNN% "
                   + "/".join(f"{v:.2f}" for v in rand) + f" (mean {sum(rand) / len(rand):.2f})")
    out += ["", line(header), "-" * len(line(header))]
    out += [line(b) for b in body]
    out.append("")
    for r in rows:
        v = r["verdict"]
        out.append(f"{r['name']}: {v['state'].upper()}: claim: {v['claim']}; evidence: {v['evidence']}")
    if any(r["stopped_early"] for r in rows):
        out.append("* the time budget stopped this variant before its planned steps on at least one seed; rerun "
                   "the same command (same --out) to continue it, or raise --minutes")
    out.append("")
    out.append(f"paper setup: {table.notes}")
    dataset = result.get("dataset", "digits")
    data = DATA_TEXT.get(dataset, dataset).format(px=result.get("image_size", 16))
    out.append("ours: " + SUBSTITUTIONS.format(data=data, backbone=result.get("backbone_text", LEGACY_BACKBONE)))
    out.append(RULES)
    out.append("thresholds: " + ", ".join(f"{k}={v}" for k, v in THRESHOLDS.items()) + "; minimum effects: "
               + ", ".join(f"{k}={v:g}" for k, v in MIN_EFFECT.items()) + " (see largessl/repro/tables.py)")
    states = [r["verdict"]["state"] for r in rows]
    out.append(f"{states.count(REPRODUCED)} reproduced, {states.count(NOT_REPRODUCED)} NOT reproduced, "
               f"{states.count(UNRESOLVED)} unresolved of {len(rows)} rows ({seeds} seed(s) each); "
               f"training + evaluation took {result['minutes']:.1f} min")
    return "\n".join(out)


def format_list(tables: dict[str, Table]) -> str:
    """``largessl repro --list``: one line per table with its default length per backbone."""
    from largessl.repro.runner import BACKBONES, DEFAULT_BACKBONE

    width = max(len(n) for n in tables)
    lines = []
    for n, t in tables.items():
        lengths = []
        for name, bb in BACKBONES.items():
            steps = bb.num_steps or t.num_steps
            minutes = bb.minutes_per_run * len(t.variants) if bb.minutes_per_run else t.minutes
            lengths.append(f"{name}{' (default)' if name == DEFAULT_BACKBONE else ''}: {steps} steps, "
                           f"--minutes {minutes:g} per seed")
        lines.append(f"{n.ljust(width)}  {t.title} [{t.source}; {len(t.variants)} variants; {'; '.join(lengths)}]")
    return "\n".join(lines)
