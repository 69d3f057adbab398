"""``largessl sweep status``: the members' states and final eval numbers as one table, and a plot of the swept
value against kNN and linear accuracy.

Everything is read from the sweep directory (``sweep.json``, each member's run directory and its ``eval/*.json``),
so it works the same for SLURM, Kubernetes and local sweeps, and on a copy. A member whose run has not started yet
shows its SLURM task's state when the sweep was submitted there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from largessl.launch.sweep import SEED_KEY, Sweep
from largessl.run.durable import save_png
from largessl.run.layout import EVAL_DIR, KNN_JSON, LINEAR_JSON
from largessl.run.status import is_run_dir, run_status

PLOT_FILE = "sweep.png"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def eval_numbers(run_dir: str | Path) -> dict[str, float | None]:
    """Final kNN top-1 (the first ``eval.knn_k``) and linear top-1 of a run, None where not (yet) evaluated."""
    out: dict[str, float | None] = {"knn": None, "linear": None, "knn_k": None}
    knn = _read_json(Path(run_dir) / EVAL_DIR / KNN_JSON)
    if knn and knn.get("top1"):
        k = str((knn.get("k") or [next(iter(knn["top1"]))])[0])
        out["knn"], out["knn_k"] = knn["top1"].get(k), int(k)
    lin = _read_json(Path(run_dir) / EVAL_DIR / LINEAR_JSON)
    if lin and isinstance(lin.get("top1"), (int, float)):
        out["linear"] = float(lin["top1"])
    return out


def member_rows(sweep: Sweep, scheduler: bool = True) -> list[dict[str, Any]]:
    """One dict per member: its values, state, step and eval numbers."""
    from largessl.run.status import slurm_job

    tasks = sweep.job.get("tasks", [])
    rows = []
    for m in sweep.members:
        row: dict[str, Any] = {"index": m.index, "name": m.name, "values": dict(m.values), "run_dir": m.run_dir,
                               "state": "pending", "exit_code": None, "step": 0, "num_steps": None, "loss": None,
                               "slurm": None, "reason": ""}
        if is_run_dir(Path(m.run_dir)):
            st = run_status(m.run_dir, scheduler=scheduler)
            row.update({k: st[k] for k in ("state", "exit_code", "step", "num_steps", "loss", "slurm", "reason")})
        elif scheduler and m.index < len(tasks):
            row["slurm"] = slurm_job(tasks[m.index])
        row.update(eval_numbers(m.run_dir))
        rows.append(row)
    return rows


def _mean_se(xs: list[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def grid_points(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members grouped by their grid values without the seed: mean and standard error over the seeds."""
    keys = [a.key for a in sweep.axes if a.key != SEED_KEY or sweep.seeds == 1]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["values"].get(k, "") for k in keys), []).append(r)
    points = []
    for combo, members in groups.items():
        p: dict[str, Any] = {"values": dict(zip(keys, combo)), "members": len(members),
                             "finished": sum(r["state"] == "finished" for r in members)}
        for metric in ("knn", "linear"):
            xs = [r[metric] for r in members if r[metric] is not None]
            p[metric] = _mean_se(xs) if xs else None
            p[f"{metric}_n"] = len(xs)
            p[f"{metric}_seeds"] = xs
        points.append(p)
    return points


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in [header, *body]]


def format_report(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """The members' table, then (with seeds) the grid points' means, then the failed members' reasons."""
    keys = [a.key for a in sweep.axes] + ([SEED_KEY] if sweep.seeds > 1 else [])
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: k for k in keys}
    header = ["#", *[short[k] for k in keys], "state", "step", "loss", "kNN", "linear"]
    body = []
    for r in rows:
        state = r["state"] + (f" ({r['exit_code']})" if r["exit_code"] not in (None, 0) else "")
        if r.get("slurm"):
            state += f", slurm {r['slurm']['job_id']} {r['slurm']['state']}"
        step = f"{r['step']}/{r['num_steps']}" if r["num_steps"] else str(r["step"])
        body.append([str(r["index"]), *[r["values"].get(k, "") for k in keys], state, step, _fmt(r["loss"], ".4g"),
                     _fmt(r["knn"]), _fmt(r["linear"])])
    done = sum(r["state"] == "finished" for r in rows)
    lines = [f"sweep {sweep.dir}: {len(rows)} members, {done} finished"
             + (f" (SLURM array {sweep.job['slurm_job_id']})" if sweep.job.get("slurm_job_id") else "")
             + (f" (Kubernetes job {sweep.job['k8s_job']})" if sweep.job.get("k8s_job") else ""), ""]
    lines += _table(header, body)
    if sweep.seeds > 1:
        pts = grid_points(sweep, rows)
        gkeys = [a.key for a in sweep.axes]
        lines += ["", f"mean ± standard error over {sweep.seeds} seeds (n = seeds with a result):"]
        pbody = []
        for p in pts:
            cells = []
            for metric in ("knn", "linear"):
                ms = p[metric]
                if ms is None:
                    cells.append("-")
                else:
                    cells.append(f"{ms[0]:.1f}" + (f" ± {ms[1]:.1f}" if ms[1] is not None else "")
                                 + f" (n={p[f'{metric}_n']})")
            pbody.append([*[p["values"][k] for k in gkeys], *cells])
        lines += _table([*[short[k] for k in gkeys], "kNN", "linear"], pbody)
    for r in rows:
        if r["state"] in ("failed", "collapsed", "died") and r["reason"]:
            lines.append(f"member {r['index']} ({r['name']}): {r['reason']}")
    return "\n".join(lines)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(sweep: Sweep, rows: list[dict[str, Any]], path: str | Path, x_key: str | None = None) -> str | None:
    """PNG of the swept value (``x_key``, default the first axis) against kNN and/or linear top-1: one line per
    combination of the other axes, the mean over seeds with standard-error bars and each seed as a dot. Returns the
    path, or None when no member has an eval result yet."""
    if not any(r["knn"] is not None or r["linear"] is not None for r in rows):
        return None
    axes = [a for a in sweep.axes if a.key != SEED_KEY or sweep.seeds == 1]
    x_key = x_key or axes[0].key
    x_axis = next((a for a in axes if a.key == x_key), None)
    if x_axis is None:
        raise ValueError(f"--x {x_key} is not a swept key ({', '.join(a.key for a in axes)})")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    numeric = _numeric(x_axis.values)
    pos = dict(zip(x_axis.values, numeric if numeric else range(len(x_axis.values))))
    others = [a.key for a in axes if a.key != x_key]
    pts = grid_points(sweep, rows)
    lines: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for p in pts:
        lines.setdefault(tuple(p["values"][k] for k in others), []).append(p)
    metrics = [(m, title) for m, title in (("knn", "kNN top-1 (%)"), ("linear", "linear top-1 (%)"))
               if any(r[m] is not None for r in rows)]  # a panel per evaluation the members ran
    fig, panels = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (metric, title) in zip(panels[0], metrics):
        for i, (combo, group) in enumerate(sorted(lines.items())):
            group = sorted(group, key=lambda p: pos[p["values"][x_key]])
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, combo)) or None
            xs = [pos[p["values"][x_key]] for p in group if p[metric] is not None]
            ms = [p[metric][0] for p in group if p[metric] is not None]
            es = [p[metric][1] or 0.0 for p in group if p[metric] is not None]
            colour = f"C{i % 10}"
            if xs:
                ax.errorbar(xs, ms, yerr=es, marker="o", color=colour, capsize=3, label=label)
            for p in group:
                for y in p[f"{metric}_seeds"]:
                    ax.plot(pos[p["values"][x_key]], y, ".", color=colour, alpha=0.35)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        if numeric:
            if min(numeric) > 0 and max(numeric) / min(numeric) >= 10:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # only the swept values are labelled
            ax.set_xticks(numeric)
            ax.set_xticklabels(x_axis.values)
        else:
            ax.set_xticks(list(pos.values()))
            ax.set_xticklabels(x_axis.values)
        ax.grid(alpha=0.3)
        if others and ax is panels[0][0]:
            ax.legend(fontsize=8)
    seeds = f", mean of {sweep.seeds} seeds ± SE" if sweep.seeds > 1 else ""
    fig.suptitle(f"sweep {Path(sweep.dir).name}: {x_key}{seeds}", fontsize=11)
    return save_png(fig, path)
