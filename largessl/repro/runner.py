"""Run the variants of one repro table with the real trainer, then measure what the paper measured.

Per variant and seed: a config built with :func:`largessl.config.load_config` (the table's overrides on top
of the shared small-scale recipe, ``train.seed`` = the seed) → :func:`largessl.train.trainer.build_trainer` on
the digits shards → ``fit()`` (one run directory per seed and variant under ``out/NAME/seed-S/``; rerunning
resumes a run stopped by its time budget and reuses a finished one) → on the held-out digits: weighted kNN
top-1 of the backbone features (:mod:`largessl.eval.knn`) and collapse indicators of the held-out
projections (:mod:`largessl.metrics.collapse`) → training curves read back from ``metrics.jsonl``. The
table's verdicts then see every seed's numbers (:mod:`largessl.repro.tables`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largessl.config import Config, config_to_dict, load_config
from largessl.data.manifest import Manifest, read_manifest
from largessl.distributed.env import DistEnv
from largessl.eval.features import extract_features
from largessl.eval.knn import knn_accuracy
from largessl.metrics.collapse import collapse_metrics
from largessl.models.convnet import ARCH
from largessl.repro.tables import MIN_EFFECT, ROW_STATES, THRESHOLDS, Table, Variant, mean_std

log = logging.getLogger(__name__)

IMAGE_SIZE = 16
"""Side of the images for the 3-conv backbone (the 8×8 originals upscaled; it halves them twice)."""


@dataclass(frozen=True)
class Backbone:
    """One scale the tables run at: the encoder, the image side and what that choice overrides (``--backbone``)."""

    name: str
    image_size: int
    overrides: tuple[str, ...]
    text: str
    """How the output's substitutions line names it."""
    num_steps: int | None = None
    """Steps per run for every table (None: each table's own :attr:`Table.num_steps`)."""
    minutes_per_run: float | None = None
    """Default time budget per variant and seed (None: each table's :attr:`Table.minutes`)."""


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(
        "resnet18", 32, ("model.arch=resnet18", "model.small_input=false", "data.image_size=32", "data.min_scale=0.8"),
        "torchvision's ResNet-18 at 32 px (ImageNet stem: 8-px maps after it), crops of 0.8-1 of the image (the "
        "demo's: smaller crops cut the glyph)", num_steps=200, minutes_per_run=4.0),
    "convnet": Backbone(
        "convnet", IMAGE_SIZE, (f"model.arch={ARCH}", f"data.image_size={IMAGE_SIZE}"),
        "a 3-conv backbone at 16 px (not ResNet-18; fast, but on photodigits it learns less than its random init "
        "scores)"),
}
"""``largessl repro --backbone``: the paper's ResNet-18 at 32 px (default; about 0.5 s a step on 2 CPU cores) or the
3-conv network at 16 px (about 0.1 s a step; the collapse patterns show there, the accuracy claims do not)."""
DEFAULT_BACKBONE = "resnet18"
EVAL_BATCH = 256
"""Images per forward pass when extracting held-out features and embeddings."""
CURVE_KEYS = ("loss", "collapse/std", "collapse/std_l2", "collapse/corr", "collapse/rank", "collapse/rankme",
              "collapse/m_o", "collapse/m_r")
"""metrics.jsonl fields kept as curves in the results."""

COMMON = (
    "data.num_workers=0", "data.shuffle_buffer=512",
    "train.device=cpu", "train.precision=fp32", "train.log_every=5", "checkpoint.at_epoch_end=false",
    "checkpoint.every_steps=1000000", "log.tensorboard=false", "log.progress=false", "eval.online_probe=false",
    "train.collapse_guard=false",
)
"""Overrides every repro run shares (before the backbone's, :data:`BACKBONES`): CPU, fp32, a checkpoint only at the end (or stop), and
no collapse guard: collapse is what the tables measure, at each row's full length (the rows meant to collapse must
run on, and a row that collapses against the paper's claim is a finding its verdict must see)."""


class Interrupted(RuntimeError):
    """A signal stopped a variant (its checkpoint is saved): rerunning the same command continues it."""


@dataclass
class VariantResult:
    """One row: what we measured for a variant, and how its training went."""

    name: str
    metrics: dict[str, float]
    """Final held-out numbers: knn (k=20), knn200, std, std_l2, corr, rank, rankme, m_o, m_r, loss, dim."""
    steps_done: int
    steps_planned: int
    minutes: float
    """Wall-clock minutes of this invocation (training + evaluation)."""
    stopped_early: bool
    """The time budget ended training before ``steps_planned`` (rerun with the same --out to continue)."""
    run_dir: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    points: list[list[float]] = field(default_factory=list)
    """Held-out 2-D embeddings (only when the projection space is 2-D, for the scatter plot)."""
    labels: list[int] = field(default_factory=list)


DATASETS = ("photodigits", "digits")
"""Embedded datasets a table can run on (the first is the default): photodigits (digits over photographs, split
by glyph and by photograph; docs/data.md) leaves room between a random and a trained encoder, digits does not."""


def prepare_data(out_dir: str | Path, dataset: str = DATASETS[0], image_size: int = IMAGE_SIZE) -> tuple[str, str]:
    """The dataset's train/val shards under ``out_dir/data`` at ``image_size`` px (written once, reused by every
    table)."""
    dest = str(Path(out_dir) / "data" / f"{dataset}-{image_size}px")
    if dataset == "digits":
        from largessl.data.digits import write_digits_shards

        return write_digits_shards(dest, image_size=image_size)
    if dataset == "photodigits":
        from largessl.data.photodigits import write_photodigits_shards

        return write_photodigits_shards(dest, image_size=image_size)
    raise ValueError(f"--data {dataset!r}: choose one of {', '.join(DATASETS)}")


def variant_config(table: Table, variant: Variant, train_url: str, val_url: str, run_dir: str | Path,
                   num_steps: int, max_minutes: float, extra: Sequence[str] = (), seed: int = 0,
                   backbone: str = DEFAULT_BACKBONE) -> Config:
    """The resolved config of one variant and seed: shared recipe < backbone < table base < variant < ``extra``
    < seed, length and paths. The seed sets ``train.seed`` (initial weights, data order, augmentation) and, for a
    method with its own ``method.seed`` (Shuffled-DBN's permutations), that too."""
    overrides = [*COMMON, *get_backbone(backbone).overrides, *table.base, *variant.overrides, *extra,
                 f"data.train_manifest={train_url}", f"data.val_manifest={val_url}", f"train.run_dir={run_dir}",
                 f"train.num_steps={num_steps}", f"train.max_minutes={max_minutes}",
                 f"train.collapse_every={max(5, num_steps // 40)}", f"train.seed={seed}"]
    cfg = load_config(None, overrides)
    if hasattr(cfg.method, "seed"):
        cfg = load_config(None, [*overrides, f"method.seed={seed}"])
    return cfg


def get_backbone(name: str) -> Backbone:
    """The :data:`BACKBONES` entry called ``name``; an unknown name raises listing the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"--backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that must match to resume a variant (the time budget may change)."""
    out = json.loads(json.dumps(cfg_dict))
    out.get("train", {}).pop("max_minutes", None)
    return out


def _check_reusable(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = _comparable(config_to_dict(load_config(saved)))
    new = _comparable(config_to_dict(cfg))
    if old != new:
        diff = sorted(f"{s}.{k}" for s in new if isinstance(new[s], dict)
                      for k in new[s] if old.get(s, {}).get(k) != new[s][k])
        raise ValueError(f"{run_dir} holds a run with a different config ({', '.join(diff) or 'method'}); "
                         "use another --out, or delete that directory to start the variant again")


@torch.no_grad()
def embed(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output whose collapse the table is about: the BN/DBN head's output (seed 000), the encoder
    output z for the SimSiam family and the predictor output p for its symmetric variant (seed 004)."""
    if not hasattr(module, "embed"):
        raise TypeError(f"{type(module).__name__} has no embed(); largessl repro needs the method's loss-space output")
    return module.embed(images, None)[1]


def _eval_batches(cfg: Config, manifest: Manifest) -> Iterable[Any]:
    from largessl.data.stream import build_eval_stream

    return build_eval_stream(cfg.data, manifest, EVAL_BATCH, 0, 1, transform="eval")


@torch.no_grad()
def held_out_embeddings(module: nn.Module, cfg: Config, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections of every held-out image as one batch, normalised with that batch's statistics.

    Training mode on a copy: BN/DBN standardise over the batch as they do while training (seed 000's
    std = 1.00 for BN and DBN is that), and the trained model's running buffers stay untouched. Running
    statistics would mix the augmented training distribution into the centre and hide or fake a collapse.
    """
    images, labels = [], []
    for batch in _eval_batches(cfg, manifest):
        images.append(batch.views[0])
        labels.append(batch.labels.long())
    probe = copy.deepcopy(module).train()
    return embed(probe, torch.cat(images)).float(), torch.cat(labels)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of :data:`CURVE_KEYS` from the run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in CURVE_KEYS}
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for k in CURVE_KEYS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                curves[k].append((int(rec["step"]), float(v)))
    return curves


def backbone_knn(backbone: nn.Module, cfg: Config, train_m: Manifest, val_m: Manifest,
                 k: tuple[int, ...]) -> dict[int, float]:
    """Weighted kNN top-1 (%) per k of ``backbone``'s features, held-out images against the training images."""
    device = torch.device("cpu")
    tf, tl = extract_features(backbone, _eval_batches(cfg, train_m), device)
    vf, vl = extract_features(backbone, _eval_batches(cfg, val_m), device)
    return knn_accuracy(tf, tl, vf, vl, k=k, num_classes=train_m.num_classes)


def evaluate(module: nn.Module, cfg: Config, train_m: Manifest, val_m: Manifest) -> tuple[dict[str, float],
                                                                                          torch.Tensor, torch.Tensor]:
    """kNN top-1 (k=20, 200) of backbone features and collapse indicators of held-out embeddings."""
    acc = backbone_knn(module.backbone, cfg, train_m, val_m, (20, 200))
    z, labels = held_out_embeddings(module, cfg, val_m)
    m = collapse_metrics(z)
    out = {"knn": acc[20], "knn200": acc[200], "dim": float(z.shape[1]),
           **{k: m[k] for k in ("std", "std_l2", "corr", "rank", "rankme", "m_o", "m_r")}}
    return out, z, labels


def random_init_knn(table: Table, train_url: str, val_url: str, out_dir: Path, seed: int,
                    backbone: str = DEFAULT_BACKBONE) -> float:
    """kNN top-1 (k=20) of the backbone with torchvision's initialisation for ``seed`` (the variants' seed, with
    ``zero_init_residual`` off: the stronger of the two random inits, as ``largessl eval knn --checkpoint random
    model.zero_init_residual=false`` builds it), the floor that training must beat."""
    from largessl.eval.source import RANDOM, load_source

    cfg = variant_config(table, table.variants[0], train_url, val_url, out_dir / "unused", 5, 1.0,
                         ("model.zero_init_residual=false",), seed, backbone)
    source, _, _ = load_source(RANDOM, cfg)
    return float(backbone_knn(source.backbone, cfg, read_manifest(train_url), read_manifest(val_url), (20,))[20])


def run_variant(table: Table, variant: Variant, out_dir: Path, train_url: str, val_url: str, num_steps: int,
                max_minutes: float, extra: Sequence[str] = (), seed: int = 0,
                backbone: str = DEFAULT_BACKBONE) -> VariantResult:
    """Train (or resume / reuse) one variant on one seed and evaluate it."""
    from largessl.train.trainer import build_trainer

    t0 = time.perf_counter()
    run_dir = out_dir / table.name / f"seed-{seed}" / variant.key
    cfg = variant_config(table, variant, train_url, val_url, run_dir, num_steps, max_minutes, extra, seed, backbone)
    _check_reusable(run_dir, cfg)
    log.info("repro %s: variant %s, seed %d (%d steps, at most %.1f min)", table.name, variant.key, seed,
             num_steps, max_minutes)
    trainer = build_trainer(cfg, DistEnv())
    result = trainer.fit()
    if result.step < num_steps and "max_minutes" not in result.reason:
        raise Interrupted(f"{table.name}/seed-{seed}/{variant.key}: {result.reason}; rerun the same command to "
                          "continue")
    train_m, val_m = read_manifest(train_url), read_manifest(val_url)
    metrics, z, labels = evaluate(trainer.module, cfg, train_m, val_m)
    curves = read_curves(run_dir)
    losses = curves["loss"]
    metrics["loss"] = losses[-1][1] if losses else float("nan")
    res = VariantResult(name=variant.name, metrics=metrics, steps_done=result.step, steps_planned=num_steps,
                        minutes=(time.perf_counter() - t0) / 60, stopped_early=result.step < num_steps,
                        run_dir=str(run_dir), curves=curves)
    if z.shape[1] == 2:
        res.points = [[round(float(a), 5), round(float(b), 5)] for a, b in z.tolist()]
        res.labels = [int(y) for y in labels]
    return res


def run_table(table: Table, out_dir: str | Path, minutes: float | None = None, num_steps: int | None = None,
              overrides: Sequence[str] = (), seeds: int = 3, dataset: str = DATASETS[0],
              backbone: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """Train and evaluate every variant of ``table`` on ``seeds`` seeds (0..seeds−1); writes
    ``out/NAME/results.json`` and ``out/NAME/NAME.png``.

    ``minutes`` (default: the backbone's per run, else the table's, × ``seeds``) is the training budget of the
    whole command, split evenly over the variants and seeds as ``train.max_minutes``; ``num_steps`` (default: the
    backbone's, else the table's) is each run's length; ``overrides`` (``key=value``) apply to every variant after
    the table's own. The random-init kNN of each seed's backbone is measured beside the variants.
    """
    from largessl.repro.plots import plot_table
    from largessl.run.durable import write_json_atomic

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (got {seeds})")
    if dataset not in DATASETS:
        raise ValueError(f"--data {dataset!r}: choose one of {', '.join(DATASETS)}")
    if any(o.split("=", 1)[0].strip() in ("train.seed", "method.seed") for o in overrides):
        raise ValueError("largessl repro sets train.seed itself (seeds 0..K-1 of --seeds K); drop the "
                         "train.seed / method.seed override")
    bb = get_backbone(backbone)
    fixed = ("model.arch", "model.small_input", "data.image_size")
    if any(o.split("=", 1)[0].strip() in fixed for o in overrides):
        raise ValueError(f"largessl repro sets {', '.join(fixed)} from --backbone ({', '.join(BACKBONES)}): the "
                         "shards are written at its image size; drop the override")
    if minutes is None:
        minutes = (bb.minutes_per_run * len(table.variants) if bb.minutes_per_run else table.minutes) * seeds
    num_steps = (bb.num_steps or table.num_steps) if num_steps is None else num_steps
    if minutes <= 0:
        raise ValueError(f"--minutes must be > 0 (got {minutes})")
    if num_steps < 5:
        raise ValueError(f"--steps must be >= 5 (got {num_steps}): collapse indicators are logged every 5 steps")
    out = Path(out_dir)
    t0 = time.perf_counter()
    train_url, val_url = prepare_data(out, dataset, bb.image_size)
    per_run = minutes / (len(table.variants) * seeds)
    runs: dict[str, list[VariantResult]] = {v.key: [] for v in table.variants}
    random_knn = []
    for seed in range(seeds):  # seed by seed, so that an interrupted command has whole tables of the first seeds
        random_knn.append(random_init_knn(table, train_url, val_url, out, seed, backbone))
        for v in table.variants:
            runs[v.key].append(run_variant(table, v, out, train_url, val_url, num_steps, per_run, overrides, seed,
                                           backbone))
    verdicts = table.verdict({k: [r.metrics for r in rs] for k, rs in runs.items()})
    rows = []
    for v in table.variants:
        rs, verdict = runs[v.key], verdicts[v.key]
        keys = rs[0].metrics.keys()
        stats = {k: mean_std([r.metrics[k] for r in rs]) for k in keys}
        rows.append({
            "key": v.key, "name": v.name, "overrides": list(v.overrides), "paper": dict(v.paper),
            "metrics": {k: m for k, (m, _) in stats.items()}, "metrics_std": {k: sd for k, (_, sd) in stats.items()},
            "seeds": [{"seed": i, "metrics": r.metrics, "steps_done": r.steps_done, "minutes": r.minutes,
                       "run_dir": r.run_dir, "stopped_early": r.stopped_early} for i, r in enumerate(rs)],
            "verdict": {"claim": verdict.claim, "state": verdict.state, "reproduced": verdict.reproduced,
                        "evidence": verdict.explain()},
            "steps_done": min(r.steps_done for r in rs), "steps_planned": num_steps,
            "stopped_early": any(r.stopped_early for r in rs), "minutes": sum(r.minutes for r in rs),
            "curves": rs[0].curves, "seed_curves": [r.curves for r in rs], "points": rs[0].points,
            "labels": rs[0].labels})
    result: dict[str, Any] = {
        "name": table.name, "title": table.title, "source": table.source, "notes": table.notes,
        "base_overrides": list(table.base), "common_overrides": list(COMMON), "thresholds": dict(THRESHOLDS),
        "columns": [list(c) for c in table.columns], "paper_columns": [list(c) for c in table.paper_columns],
        "curves": list(table.curves), "rows": rows, "overrides": list(overrides), "minutes_budget": minutes,
        "num_steps": num_steps, "seeds": seeds, "dataset": dataset, "minutes": (time.perf_counter() - t0) / 60,
        "backbone": bb.name, "backbone_text": bb.text, "backbone_overrides": list(bb.overrides),
        "image_size": bb.image_size, "random_init_knn": random_knn,
        "min_effect": dict(MIN_EFFECT),
        "counts": {s: sum(r["verdict"]["state"] == s for r in rows) for s in ROW_STATES},
    }
    table_dir = out / table.name
    result["json"] = str(table_dir / "results.json")
    result["png"] = plot_table(result, table_dir / f"{table.name}.png")
    write_json_atomic(result["json"], result)
    return result
