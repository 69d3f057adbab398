"""Model cards: what a published backbone is, where it came from and how good it is.

A card is built from a run directory (config, metrics.jsonl, the evaluation stages' JSON) and the
checkpoint's meta. ``Hub.push`` adds name, version, created time and the sha256 of every file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_FORMAT = "largessl-model-card/1"
EVAL_DIR = "eval"
LINEAR_JSON = "linear.json"
KNN_JSON = "knn.json"
METRICS_FILE = "metrics.jsonl"
_COLLAPSE_KEYS = ("std", "corr", "rank", "rankme", "m_o", "m_r", "alignment", "uniformity")


def _is_collapse_key(key: str) -> bool:
    """Collapse metrics in metrics.jsonl: ``collapse/*`` keys or the papers' names (std, corr, rank, ...)."""
    leaf = key.rsplit("/", 1)[-1]
    return key.startswith("collapse") or leaf in _COLLAPSE_KEYS


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (torn write?); skipped", path, n)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def loss_curve(records: list[dict[str, Any]], max_points: int = 200) -> list[list[float]]:
    """(step, loss) pairs of the training loss, evenly thinned to at most ``max_points`` (last point kept)."""
    pts = [[float(r["step"]), float(r["loss"])] for r in records
           if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))
           and math.isfinite(r["loss"])]
    if len(pts) <= max_points:
        return pts
    stride = len(pts) / max_points
    thinned = [pts[int(i * stride)] for i in range(max_points - 1)]
    return thinned + [pts[-1]]


def final_collapse_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """The collapse metrics of the last record that has any (std, corr, rank, RankMe, m_o/m_r, ...)."""
    for rec in reversed(records):
        found = {k: float(v) for k, v in rec.items() if _is_collapse_key(k) and isinstance(v, (int, float))}
        if found:
            return found
    return {}


def read_eval_results(run_dir: str | Path) -> dict[str, Any]:
    """Linear and kNN results written by the evaluation stages into ``run_dir/eval/`` (missing → absent)."""
    out: dict[str, Any] = {}
    base = Path(run_dir) / EVAL_DIR
    for key, name in (("linear", LINEAR_JSON), ("knn", KNN_JSON)):
        p = base / name
        if p.is_file():
            try:
                out[key] = json.loads(p.read_text())
            except json.JSONDecodeError:
                log.warning("%s is not valid JSON; its metrics are left out of the card", p)
    return out


def card_metrics(records: list[dict[str, Any]], evals: dict[str, Any]) -> dict[str, Any]:
    """The card's metrics block: linear top-1/top-5, kNN top-1 per k, final loss and collapse metrics."""
    m: dict[str, Any] = {}
    lin = evals.get("linear")
    if lin:
        m["linear_top1"] = lin.get("top1")
        m["linear_top5"] = lin.get("top5")
    knn = evals.get("knn")
    if knn:
        m["knn_top1"] = {str(k): v for k, v in knn.get("top1", {}).items()}
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    if losses:
        m["final_loss"] = float(losses[-1])
    collapse = final_collapse_metrics(records)
    if collapse:
        m["collapse"] = collapse
    return m


def build_card(config: dict[str, Any], meta: dict[str, Any], run_dir: str | Path | None,
               num_features: int, dataset: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, index summary) for a checkpoint's config and meta plus what ``run_dir`` holds."""
    records = read_metrics(run_dir) if run_dir else []
    evals = read_eval_results(run_dir) if run_dir else {}
    metrics = card_metrics(records, evals)
    curve = loss_curve(records)
    model = config.get("model", {})
    method = config.get("method", {}).get("name", "unknown")
    card = {
        "format": CARD_FORMAT,
        "method": method,
        "architecture": {
            "arch": model.get("arch", "resnet50"),
            "small_input": bool(model.get("small_input", False)),
            "num_features": num_features,
            "weights": "torchvision ResNet state_dict without fc (load into resnetXX(...) with fc=Identity)",
        },
        "dataset": dataset,
        "epochs": meta.get("epoch"),
        "step": meta.get("step"),
        "config": config,
        "metrics": metrics,
        "evaluation": evals,
        "loss_curve": curve,
        "git_revision": meta.get("git_revision", "unknown"),
        "source_checkpoint": meta.get("path", ""),
    }
    summary = {
        "method": method,
        "arch": card["architecture"]["arch"] + (" (small input)" if card["architecture"]["small_input"] else ""),
        "dataset": dataset.get("name") or dataset.get("manifest_id") or dataset.get("train_manifest", ""),
        "epochs": meta.get("epoch"),
        "metrics": metrics,
        "loss_curve": loss_curve(records, max_points=60),
        "git_revision": card["git_revision"],
    }
    return card, summary
