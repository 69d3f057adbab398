"""Model cards: what a published backbone is, where it came from and how good it is.

A card is built from a run directory (config, metrics.jsonl, every evaluation stage's ``eval/*.json``),
the checkpoint's meta and the training manifest. It names the data set (name, manifest id and sha256),
the method with its paper and how the run's recipe differs from the paper's (``configs/*_r50_in1k.yaml``),
evaluation results with their protocol, collapse metrics, skipped data, git revision, license and a load
snippet per export format. ``Hub.push`` adds name, version, created time and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from largessl.run.layout import EVAL_DIR, METRICS_FILE

log = logging.getLogger(__name__)

CARD_FORMAT = "largessl-model-card/1"
SKIP_KEYS = ("skipped_samples", "skipped_shards")
PAPER_URLS = {
    "barlow_twins": "https://arxiv.org/abs/2103.03230",
    "vicreg": "https://arxiv.org/abs/2105.04906",
    "simsiam": "https://arxiv.org/abs/2011.10566",
}
"""arXiv pages of the methods' papers (the citation itself comes from the method module's docstring)."""
RECIPE_KEYS = ("model.arch", "model.small_input", "model.zero_init_residual", "method.", "data.augment",
               "data.image_size", "data.num_views", "data.min_scale", "optim.", "train.global_batch_size",
               "train.epochs", "train.num_steps", "train.grad_clip")
"""Config keys (or section prefixes) that make up a training recipe; the rest is plumbing (paths, workers)."""
_NOT_RECIPE = ("method.collective",)  # how a loss is computed across ranks, not what it computes
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval", "dev"}
_PROTOCOLS = {"linear": "linear probe on frozen features", "knn": "weighted kNN on frozen features",
              "finetune_1pct": "fine-tuning with 1% of the labels",
              "finetune_10pct": "fine-tuning with 10% of the labels"}
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
    """Every evaluation stage's ``run_dir/eval/<stage>.json`` (linear, knn, finetune_1pct, ...), by stage."""
    out: dict[str, Any] = {}
    base = Path(run_dir) / EVAL_DIR
    if not base.is_dir():
        return out
    for p in sorted(base.glob("*.json")):
        if p.name.startswith("."):
            continue  # a stage's temp file
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            log.warning("%s is not valid JSON; its metrics are left out of the card", p)
            continue
        if isinstance(data, dict):
            out[p.stem] = data
    return out


def eval_protocol(stage: str, result: dict[str, Any]) -> str:
    """One line saying how ``stage``'s numbers were measured (from the keys its JSON holds)."""
    parts = [_PROTOCOLS.get(stage, stage.replace("_", " "))]
    if result.get("protocol"):
        parts.append(f"protocol {result['protocol']}")
    if result.get("k"):
        parts.append(f"k={', '.join(str(k) for k in result['k'])}")
    for key, label in (("temperature", "temperature"), ("label_fraction", "label fraction"),
                       ("epochs", "epochs"), ("lr", "lr"), ("batch_size", "batch"),
                       ("weight_decay", "weight decay")):
        if isinstance(result.get(key), (int, float)) and not isinstance(result.get(key), bool):
            parts.append(f"{label} {result[key]:g}")
    if isinstance(result.get("num_train"), int) or isinstance(result.get("num_val"), int):
        parts.append(f"{result.get('num_train', '?')} train / {result.get('num_val', '?')} val images")
    return ", ".join(parts)


def card_metrics(records: list[dict[str, Any]], evals: dict[str, Any]) -> dict[str, Any]:
    """The card's metrics block: ``<stage>_top1``/``_top5`` per evaluation, kNN top-1 per k, loss, collapse."""
    m: dict[str, Any] = {}
    for stage, res in sorted(evals.items()):
        top1 = res.get("top1")
        if isinstance(top1, dict):  # kNN: one top-1 per k
            m[f"{stage}_top1"] = {str(k): v for k, v in top1.items()}
        elif isinstance(top1, (int, float)):
            m[f"{stage}_top1"] = top1
        if isinstance(res.get("top5"), (int, float)):
            m[f"{stage}_top5"] = res["top5"]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    if losses:
        m["final_loss"] = float(losses[-1])
    collapse = final_collapse_metrics(records)
    if collapse:
        m["collapse"] = collapse
    return m


def skip_counters(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, int]:
    """``skipped_samples``/``skipped_shards`` of the last metrics record that has them (else the checkpoint's)."""
    for source in [*reversed(records), meta.get("metrics") or {}]:
        found = {k: int(source[k]) for k in SKIP_KEYS if isinstance(source.get(k), (int, float))}
        if found:
            return found
    return {}


def dataset_name(url: str, extra: dict[str, Any]) -> tuple[str, str]:
    """(data set name, split) of a manifest: its ``extra`` name/dataset field, else its folder names.

    ``s3://b/imagenet/train/manifest.json`` → ("imagenet", "train"): a split folder is not the data set.
    """
    name = ""
    for holder in [extra, *[v for v in extra.values() if isinstance(v, dict)]]:
        for key in ("name", "dataset"):
            if isinstance(holder.get(key), str) and holder[key]:
                name = holder[key]
                break
        if name:
            break
    folders = [p for p in url.split("://", 1)[-1].split("/")[:-1] if p]
    split = folders[-1] if folders and folders[-1].lower() in _SPLIT_NAMES else ""
    if not name:
        rest = folders[:-1] if split else folders
        name = rest[-1] if rest else (split or "unknown")
    return name, split


def dataset_info(config: dict[str, Any]) -> dict[str, Any]:
    """Name, split, manifest URL, id (sha256 of its canonical content) and file sha256 of the training data."""
    data = config.get("data", {})
    url = data.get("train_manifest", "")
    info: dict[str, Any] = {"manifest_url": url}
    if not url:
        info.update(name="unknown", note="the run's config names no training manifest")
        return info
    try:
        from largessl.data import io as data_io
        from largessl.data.manifest import parse_manifest

        opts = data_io.storage_options_for(url, data.get("endpoint_url", ""))
        with data_io.open_url(url, "rb", opts) as f:
            raw = f.read()
        m = parse_manifest(raw, url)
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("cannot read the training manifest %s (%s); the card records its URL and name only", url, e)
        name, split = dataset_name(url, {})
        info.update(name=name, split=split, manifest_id=None, manifest_sha256=None,
                    note=f"manifest unreadable at push time: {e}")
        return info
    name, split = dataset_name(url, m.extra)
    info.update(name=name, split=split, manifest_id=m.id, manifest_sha256=hashlib.sha256(raw).hexdigest(),
                num_samples=m.num_samples, num_classes=m.num_classes, num_shards=len(m.shards))
    return info


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_recipe_key(key: str) -> bool:
    return key not in _NOT_RECIPE and any(key == r or (r.endswith(".") and key.startswith(r)) for r in RECIPE_KEYS)


def paper_recipes(configs_dir: Path | None = None) -> dict[str, Path]:
    """``configs/*_r50_in1k.yaml`` by the method they configure (the papers' ImageNet recipes)."""
    import yaml

    base = configs_dir or Path(__file__).resolve().parents[2] / "configs"
    out: dict[str, Path] = {}
    for p in sorted(base.glob("*_r50_in1k.yaml")):
        try:
            method = (yaml.safe_load(p.read_text()) or {}).get("method", {}).get("name")
        except (yaml.YAMLError, OSError, AttributeError):
            continue
        if method and method not in out:
            out[method] = p
    return out


def recipe_differences(config: dict[str, Any], recipe: Path) -> list[dict[str, Any]]:
    """[{key, paper, run}] for every recipe key where the run's resolved config differs from ``recipe``."""
    from largessl.config import config_to_dict, load_config

    paper = _flatten(config_to_dict(load_config(recipe, [])))
    run = _flatten(config)
    diffs = []
    for key in sorted(set(paper) | set(run)):
        if not _is_recipe_key(key):
            continue
        a, b = paper.get(key), run.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool) and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
            continue
        if a != b:
            diffs.append({"key": key, "paper": a, "run": b})
    return diffs


def paper_info(config: dict[str, Any], configs_dir: Path | None = None) -> dict[str, Any]:
    """The method's paper (citation, link) and how the run's recipe differs from the paper's config."""
    method = config.get("method", {}).get("name", "unknown")
    info: dict[str, Any] = {"citation": "", "url": PAPER_URLS.get(method, "")}
    try:
        from largessl.methods import METHODS

        module = sys.modules.get(METHODS.get(method).__module__)
        doc = (module.__doc__ or "").strip() if module else ""
        info["citation"] = " ".join(doc.split("\n\n", 1)[0].split())
    except (KeyError, ValueError, AttributeError):
        pass
    recipe = paper_recipes(configs_dir).get(method)
    if recipe is None:
        info.update(recipe=None, differences=None, note=f"no paper recipe configs/*_r50_in1k.yaml for {method}")
        return info
    info["recipe"] = f"configs/{recipe.name}"
    try:
        info["differences"] = recipe_differences(config, recipe)
    except ValueError as e:
        info.update(differences=None, note=f"cannot compare with {recipe.name}: {e}")
    return info


def build_card(config: dict[str, Any], meta: dict[str, Any], run_dir: str | Path | None,
               num_features: int, dataset: dict[str, Any], license: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, index summary) for a checkpoint's config and meta plus what ``run_dir`` holds."""
    records = read_metrics(run_dir) if run_dir else []
    evals = read_eval_results(run_dir) if run_dir else {}
    metrics = card_metrics(records, evals)
    curve = loss_curve(records)
    model = config.get("model", {})
    method = config.get("method", {}).get("name", "unknown")
    architecture: dict[str, Any] = {
        "arch": model.get("arch", "resnet50"),
        "small_input": bool(model.get("small_input", False)),
        "num_features": num_features,
        "weights": "torchvision ResNet state_dict without fc (load into resnetXX(...) with fc=Identity)",
    }
    if str(architecture["arch"]).startswith("timm/"):
        # what rebuilds the model: the export's timm.create_model arguments come from here
        architecture.update(image_size=int(model.get("image_size", 0) or 0),
                            timm_kwargs=dict(model.get("timm_kwargs") or {}),
                            weights=f"timm {str(architecture['arch'])[len('timm/'):]} state_dict with num_classes=0 "
                                    "(timm's own key names)")
    card = {
        "format": CARD_FORMAT,
        "method": method,
        "paper": paper_info(config),
        "architecture": architecture,
        "dataset": dataset,
        "epochs": meta.get("epoch"),
        "step": meta.get("step"),
        "config": config,
        "metrics": metrics,
        "evaluation": {stage: {"protocol": eval_protocol(stage, res), "result": res} for stage, res in evals.items()},
        "data_skips": skip_counters(records, meta),
        "loss_curve": curve,
        "git_revision": meta.get("git_revision", "unknown"),
        "license": license or "unspecified",
        "source_checkpoint": meta.get("path", ""),
    }
    summary = {
        "method": method,
        "arch": card["architecture"]["arch"] + (" (small input)" if card["architecture"]["small_input"] else ""),
        "dataset": dataset.get("name") or dataset.get("manifest_id") or dataset.get("manifest_url", ""),
        "epochs": meta.get("epoch"),
        "metrics": metrics,
        "loss_curve": loss_curve(records, max_points=60),
        "git_revision": card["git_revision"],
        "license": card["license"],
    }
    return card, summary
