"""Semi-supervised evaluation: fine-tune the whole network on 1% / 10% of the labels (seed 002 Table 2).

Per label fraction: the subset (a manifest of its own, see :mod:`largessl.data.subset`) is taken from
``eval.finetune.subset_manifests``, else built from ``label_lists`` (SimCLR's image lists, comparable
with the papers) or drawn class-balanced from ``seed``, written once under ``subset_dir`` and reused on
reruns. Then backbone + a fresh linear head train together, data-parallel (DDP averages gradients over
equal per-rank batches; BatchNorm keeps per-rank batch statistics, as in Barlow Twins' evaluation code),
with two SGD parameter groups (backbone lr, head lr; scaled by batch/256), a per-step cosine schedule and
the linear protocol's augmentation. It checkpoints every epoch and on a stop signal, like the linear
protocol (:mod:`largessl.eval.supervised`), and the result lands in ``eval/finetune_<p>pct.json`` in the
shape of ``linear.json`` with ``"protocol": "finetune"``: the model card picks it up.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.config import Config
from largessl.data import io
from largessl.distributed.collectives import barrier, broadcast_object, get_rank, get_world_size
from largessl.eval.inputs import (
    eval_batches,
    labelled_manifests,
    read_labelled,
    show_progress,
    tb_writer,
    train_stream,
)
from largessl.eval.linear import scaled_lr
from largessl.eval.supervised import (
    STOPPED,
    StopCheck,
    SupervisedRun,
    evaluate_classifier,
    fit_supervised,
    wrap_ddp,
)
from largessl.models.timm_backbone import layer_decay_groups
from largessl.run.durable import write_json_atomic
from largessl.run.layout import EVAL_DIR
from largessl.run.progress import ProgressBar

log = logging.getLogger(__name__)

SUBSETS_DIR = "subsets"


def result_name(percent: float) -> str:
    """``finetune_10pct`` for 10, ``finetune_0.5pct`` for 0.5 (the JSON file and checkpoint folder name)."""
    return f"finetune_{percent:g}pct"


class Classifier(nn.Module):
    """Backbone followed by a linear head; bf16 autocast for the backbone on CUDA."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (fp32)."""
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            feats = self.backbone(images)
        return self.head(feats.float().flatten(1))


# ---------------------------------------------------------------------------------------------------
# Label subsets


def _check_prebuilt(cfg: Config, url: str, train: Any, percent: float) -> str:

    sub = read_labelled(cfg, url)
    info = sub.extra.get("subset")
    if not isinstance(info, dict) or info.get("source_id") != train.id:
        raise ValueError(f"{url} is not a subset of {train.url} (its source id is "
                         f"{str((info or {}).get('source_id'))[:12]}, the train manifest's is {train.id[:12]}); "
                         "build it with `largessl shards subset` from the same train manifest")
    if info.get("method") == "seeded" and abs(float(info.get("percent", 0.0)) - percent) > 1e-9:
        raise ValueError(f"{url} holds {info.get('percent')}% of the labels but eval.finetune.percents says {percent}")
    return url


def subset_for(cfg: Config, index: int, train: Any, out_dir: Path, group: ProcessGroup | None = None) -> str:
    """The subset manifest of the ``index``-th percent: prebuilt, reused, or built by all ranks together."""
    from largessl.data.subset import SubsetRequest, existing_subset

    ft = cfg.eval.finetune
    percent = ft.percents[index]
    if ft.subset_manifests:
        return _check_prebuilt(cfg, ft.subset_manifests[index], train, percent)
    request = SubsetRequest(percent=percent, seed=ft.seed, list_file=ft.label_lists[index] if ft.label_lists else "",
                            source_root=ft.source_root)
    ident = request.identity()
    tag = f"list-{ident['list_sha256'][:12]}" if request.list_file else f"seed{ft.seed}"
    base = ft.subset_dir or str(out_dir / EVAL_DIR / SUBSETS_DIR)
    dest = io.join_url(base, f"{percent:g}pct-{tag}-{train.id[:12]}")
    found: Any = None
    if get_rank(group) == 0:
        try:
            found = existing_subset(dest, train, request, io.storage_options_for(dest, cfg.data.endpoint_url))
        except ValueError as e:
            found = e
    found = broadcast_object(found, 0, group)  # every rank raises or proceeds together
    if isinstance(found, Exception):
        raise ValueError(str(found))
    if found:
        log.info("%g%% labels: reusing subset %s", percent, found)
        return str(found)

    return build_subset_distributed(train, dest, request, group, progress=show_progress(cfg, group),
                                    endpoint_url=cfg.data.endpoint_url)


def build_subset_distributed(train: Any, dest: str, request: Any, group: ProcessGroup | None = None,
                             shard_bytes: int = 256 * 1000**2, threads: int = 4, progress: bool = False,
                             endpoint_url: str = "") -> str:
    """:func:`largessl.data.subset.build_subset` with the shards split over the ranks (O(dataset / W) each).

    Rank r scans the labels of source shards r, r+W, ... and writes output shards r, r+W, ...; the
    selection is made on rank 0 and broadcast (object collectives on CPU: plain Python lists).
    """
    from largessl.data.subset import finish, plan_outputs, scan_shard, select, write_output

    rank, world = get_rank(group), get_world_size(group)
    src_opts = io.storage_options_for(train.url, endpoint_url)
    dest_opts = io.storage_options_for(dest, endpoint_url)
    mine = list(range(rank, len(train.shards), world))
    log.info("building the label subset %s (%s) from %d shards on %d rank(s)", dest, request.identity(),
             len(train.shards), world)
    bar = ProgressBar(len(mine), 0, rank == 0 and progress, desc="subset: scan labels (shards)")
    with ThreadPoolExecutor(threads) as pool:
        def scan(i: int) -> Any:
            out = scan_shard(train, i, src_opts)
            bar.update(1)
            return out

        local = dict(zip(mine, pool.map(scan, mine)))
    bar.close()
    index: dict[int, Any] = {}
    for src in range(world):
        index.update(broadcast_object(local if src == rank else None, src, group))  # type: ignore[arg-type]
    outcome: Any = None
    if rank == 0:
        try:
            outcome = select(train, index, request)
        except ValueError as e:
            outcome = e
    outcome = broadcast_object(outcome, 0, group)
    if isinstance(outcome, Exception):
        raise ValueError(str(outcome))
    selection = outcome
    plan = plan_outputs(train, selection, shard_bytes)
    outputs = list(range(rank, len(plan), world))
    bar = ProgressBar(sum(len(plan[j]) for j in outputs), 0, rank == 0 and progress, desc="subset: copy (images)")
    rows_local = {j: write_output(train, dest, j, plan[j], dest_opts, lambda: bar.update(1)) for j in outputs}
    bar.close()
    rows: dict[int, Any] = {}
    for src in range(world):
        rows.update(broadcast_object(rows_local if src == rank else None, src, group))  # type: ignore[arg-type]
    url = ""
    if rank == 0:
        url = finish(train, dest, [rows[j] for j in range(len(plan))], request, selection, index, dest_opts)
    url = str(broadcast_object(url, 0, group))
    barrier(group)
    return url


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


def finetune_one(cfg: Config, source: Any, index: int, subset_url: str, val: Any, out_dir: Path,
                 device: torch.device, stop: StopCheck, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Fine-tune a copy of the backbone on one label subset and evaluate it on ``val``."""

    ft = cfg.eval.finetune
    percent = ft.percents[index]
    backbone_lr, head_lr = ft.lrs(index)
    subset = read_labelled(cfg, subset_url)
    if subset.class_names != val.class_names:
        raise ValueError(f"{subset_url} and {val.url} disagree on the class names")
    if ft.batch_size % get_world_size(group):
        raise ValueError(f"eval.finetune.batch_size={ft.batch_size} is not divisible by the world size "
                         f"{get_world_size(group)}")
    if subset.num_samples < ft.batch_size:
        raise ValueError(f"the {percent:g}% subset holds {subset.num_samples} samples, fewer than one batch "
                         f"(eval.finetune.batch_size={ft.batch_size}); lower the batch size")
    stream = train_stream(cfg, subset, ft.batch_size, ft.seed, group)
    torch.manual_seed(ft.seed)  # the same head on every rank
    net = copy.deepcopy(source.backbone).to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    model = Classifier(net, subset.num_classes).to(device)
    ddp = wrap_ddp(model, device, group)
    if ft.layer_decay < 1.0:
        backbone_groups = layer_decay_groups(model.backbone, scaled_lr(backbone_lr, ft.batch_size), ft.layer_decay)
    else:
        backbone_groups = [{"params": list(model.backbone.parameters()), "lr": scaled_lr(backbone_lr, ft.batch_size)}]
    head_group = {"params": list(model.head.parameters()), "lr": scaled_lr(head_lr, ft.batch_size)}
    lrs = [g["lr"] for g in backbone_groups] + [head_group["lr"]]
    opt = torch.optim.SGD([*backbone_groups, head_group], lr=lrs[-1], momentum=ft.momentum,
                          weight_decay=ft.weight_decay)
    name = result_name(percent)
    settings = {"percent": percent, "subset": subset.id, "val": val.id, "weights": source.weights,
                "epochs": ft.epochs, "batch_size": ft.batch_size, "backbone_lr": backbone_lr, "head_lr": head_lr,
                "momentum": ft.momentum, "weight_decay": ft.weight_decay, "seed": ft.seed,
                "image_size": cfg.data.image_size, "min_scale": cfg.eval.linear_min_scale,
                "world_size": get_world_size(group)}
    if ft.layer_decay < 1.0:  # only then: the settings of earlier (decay-free) results stay what they were
        settings["layer_decay"] = ft.layer_decay
    run = SupervisedRun(f"finetune {percent:g}%", str(out_dir / EVAL_DIR / name), settings, ft.epochs, lrs,
                        show_progress(cfg, group))
    writer = tb_writer(cfg, out_dir, group)
    try:
        status = fit_supervised(run, model, ddp, opt, stream, device, stop, group, writer, model.train)
        if status == STOPPED:
            return {"stopped": True, "reason": stop.reason}
        model.eval()
        val_stream = eval_batches(cfg, val, cfg.eval.feature_batch_size, group)
        bar = ProgressBar(val_stream.batches_per_epoch, 0, show_progress(cfg, group), desc=f"{run.name} (val)")
        try:
            metrics = evaluate_classifier(model, val_stream.iterate(0), device, group, bar)
        finally:
            bar.close()
        if writer is not None:
            writer.add_scalar(f"eval/{name}_top1", metrics["top1"], ft.epochs)
    finally:
        if writer is not None:
            writer.close()
    info = subset.extra.get("subset", {})
    return {**metrics, "protocol": "finetune", "label_percent": percent, "lr": head_lr, "head_lr": head_lr,
            "backbone_lr": backbone_lr, "epochs": ft.epochs, "batch_size": ft.batch_size,
            "weight_decay": ft.weight_decay, "momentum": ft.momentum, "num_train": subset.num_samples,
            "subset_manifest": subset_url, "subset_id": subset.id, "subset_method": info.get("method"),
            "world_size": get_world_size(group)}


def finetune_all(cfg: Config, source: Any, out_dir: Path, device: torch.device,
                 group: ProcessGroup | None = None) -> dict[str, Any]:
    """Every configured label fraction in turn; ``{"finetune_<p>pct": result}`` or ``{"stopped": True, ...}``."""

    train, val = labelled_manifests(cfg)
    results: dict[str, Any] = {}
    with StopCheck(device, group) as stop:
        for i, percent in enumerate(cfg.eval.finetune.percents):
            subset_url = subset_for(cfg, i, train, out_dir, group)
            if stop.agreed():
                return {"stopped": True, "reason": stop.reason}
            res = finetune_one(cfg, source, i, subset_url, val, out_dir, device, stop, group)
            if res.get("stopped"):
                log.warning("fine-tuning on %g%% of the labels stopped (%s); rerun the same command to resume",
                            percent, res["reason"])
                return res
            res.update(train_manifest=train.url, val_manifest=val.url, source=source.description)
            name = result_name(percent)
            if get_rank(group) == 0:
                write_json_atomic(out_dir / EVAL_DIR / f"{name}.json", res)
            log.info("fine-tuning on %g%% of the labels (%d images): top-1 %.2f%%, top-5 %.2f%%", percent,
                     res["num_train"], res["top1"], res["top5"])
            results[name] = res
            barrier(group)
    return results

