"""``largessl eval linear|knn|finetune``: evaluate a checkpoint, a hub model or a random init on labelled manifests.

    largessl eval linear --checkpoint runs/bt --train data/train/manifest.json --val data/val/manifest.json
    largessl eval knn --checkpoint hub:bt-r50-in1k@v1 --hub s3://models/hub --out runs/eval-bt ...
    torchrun --nproc-per-node 8 -m largessl eval linear --checkpoint runs/bt --config configs/eval_barlow_twins.yaml
    largessl eval finetune --checkpoint runs/bt eval.finetune.percents=[10]

The evaluated model's own resolved config is the base (so image size and stem match pretraining);
``--config`` files and ``key=value`` overrides go on top. Results land in
``<out>/eval/{linear,knn,finetune_<p>pct}.json`` and ``<out>/tb``; ``<out>`` defaults to the checkpoint's
run directory. Exit code 75 means a stop signal was handled and state saved: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from largessl.config import load_config

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl eval``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="run dir / step folder, a folder from `hub pull`, hub:NAME[@VERSION], or 'random' "
                             "(random-init baseline; set model.* overrides)")
    common.add_argument("--hub", default=None, help="hub URL for hub:NAME (default: hub.url of the config)")
    common.add_argument("--train", default=None, help="labelled train manifest (default: data.train_manifest)")
    common.add_argument("--val", default=None, help="labelled val manifest (default: data.val_manifest)")
    common.add_argument("--out", default=None, help="output dir for eval/*.json and tb/ (default: the run dir)")
    common.add_argument("--config", action="append", default=[], help="extra YAML config file (repeatable)")
    common.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.linear_lr=0.3")
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    sub.add_parser("linear", parents=[common], help="linear probe on the frozen backbone (top-1/top-5)")
    sub.add_parser("knn", parents=[common], help="weighted kNN on frozen features (eval.knn_k)")
    sub.add_parser("finetune", parents=[common],
                   help="fine-tune the whole network on 1%%/10%% of the labels (eval.finetune.*)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl eval``."""
    from largessl.distributed.env import (
        detect_env,
        init_distributed,
        resolve_backend,
        setup_logging,
        shutdown_distributed,
    )
    from largessl.eval.runner import evaluate_finetune, evaluate_knn, evaluate_linear
    from largessl.eval.source import load_source, resolve_config
    from largessl.run import exit_codes
    from largessl.run.precision import resolve_device

    overrides = list(args.overrides)
    if args.train:
        overrides.append(f"data.train_manifest={args.train}")
    if args.val:
        overrides.append(f"data.val_manifest={args.val}")
    prelim = load_config(args.config or None, overrides)
    env = detect_env()
    setup_logging(env, prelim.log.level)
    source, model_cfg, run_dir = load_source(args.checkpoint, prelim, args.hub, prelim.hub.endpoint_url)
    cfg = resolve_config(model_cfg, args.config, overrides) if model_cfg else prelim
    out = Path(args.out) if args.out else run_dir
    if out is None:
        raise ValueError(f"--checkpoint {args.checkpoint} has no run directory; pass --out DIR for the results")
    # set_device (inside resolve_device) before the first collective: NCCL binds to the current device
    device = resolve_device(cfg.train.device, env.local_rank)
    init_distributed(env, resolve_backend(cfg.dist.backend, device), cfg.dist.timeout_minutes)
    try:
        source.backbone.to(device)
        fn = {"linear": evaluate_linear, "knn": evaluate_knn, "finetune": evaluate_finetune}[args.protocol]
        result = fn(cfg, source, out, device)
    finally:
        shutdown_distributed()
    if result.get("stopped"):
        log.warning("%s stopped (%s); exit %d: rerun the same command to resume", args.protocol,
                    result.get("reason", "signal"), exit_codes.REQUEUE)
        return exit_codes.REQUEUE
    if env.is_main:
        log.info("%s -> %s", summary(args.protocol, result), out / "eval")
    return 0


def summary(protocol: str, result: dict[str, Any]) -> str:
    """One line of top-1 accuracies of an evaluation result."""
    if protocol == "finetune":
        return ", ".join(f"{name}: top-1 {r['top1']:.2f}%" for name, r in result.items())
    top1 = result["top1"]
    text = f"{top1:.2f}%" if isinstance(top1, float) else ", ".join(f"k={k}: {v:.2f}%" for k, v in top1.items())
    return f"{protocol} top-1 {text}"
