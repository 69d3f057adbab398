"""``largessl demo``: digits shards → Barlow Twins on a small ResNet → kNN / linear probe vs random init.

Runs on a fresh machine with no data and no network: scikit-learn's bundled 8×8 digits (real labelled
images) are upscaled into JPEG WebDataset shards, a ResNet-18 (CIFAR stem, 32 px) is pretrained for a few
minutes on CPU, and its frozen features are compared with those of a randomly initialised twin.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from largessl.config import load_config
from largessl.dist.env import DistEnv, setup_logging

log = logging.getLogger(__name__)

DEMO_OVERRIDES = [
    "model.arch=resnet18", "model.small_input=false",
    "method.name=barlow_twins", "method.projector=1024-1024", "method.lambd=0.005",
    "data.augment=small", "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=500",
    "data.pin_memory=false",
    "optim.name=lars", "optim.base_lr=0.3", "optim.bias_norm_lr=0.01", "optim.weight_decay=0.00001",
    "optim.warmup_epochs=1", "optim.final_lr_ratio=0.01",
    "train.global_batch_size=128", "train.device=cpu", "train.log_every=10", "train.collapse_every=50",
    "checkpoint.every_steps=100",
    "eval.knn_k=[20]", "eval.online_probe=true",
]
"""The embedded demo recipe (configs/demo_digits.yaml holds the same values for reading)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl demo``."""
    p.add_argument("--out", default="demo-out", help="folder for shards and the run directory (default demo-out)")
    p.add_argument("--steps", type=int, default=150, help="pretraining steps (default 150, about 3 min on 2 cores)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training (default 2)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs on cached features")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides")


def _features(backbone: torch.nn.Module, cfg, manifest) -> tuple[torch.Tensor, torch.Tensor]:
    from largessl.data.stream import build_eval_stream
    from largessl.eval.features import extract_features

    stream = build_eval_stream(cfg.data, manifest, 256, 0, 1, transform="eval")
    with torch.no_grad():
        return extract_features(backbone, stream, "cpu")


def evaluate_encoder(backbone: torch.nn.Module, cfg, train_manifest, val_manifest, linear_epochs: int) -> dict:
    """kNN top-1 and linear-probe top-1 (%) of a frozen backbone on the digits val split."""
    from largessl.eval.knn import knn_accuracy
    from largessl.eval.linear import train_linear_probe

    tr_x, tr_y = _features(backbone, cfg, train_manifest)
    va_x, va_y = _features(backbone, cfg, val_manifest)
    k = cfg.eval.knn_k[0]
    knn = knn_accuracy(tr_x, tr_y, va_x, va_y, k=[k], temperature=cfg.eval.knn_temperature)[k]
    lin = train_linear_probe(tr_x, tr_y, va_x, va_y, epochs=linear_epochs, lr=0.1, batch_size=256,
                             weight_decay=0.0, normalize=True)
    return {"knn_top1": float(knn), "linear_top1": float(lin["top1"])}


def run_demo(out: str, steps: int, threads: int = 2, linear_epochs: int = 100,
             overrides: list[str] | None = None) -> dict:
    """Build shards, pretrain, evaluate both encoders; returns the results (also printed as a table)."""
    from largessl.data.digits import write_digits_shards
    from largessl.data.manifest import read_manifest
    from largessl.methods import build_method
    from largessl.models import build_backbone
    from largessl.train.checkpoint import load_model_state
    from largessl.train.trainer import build_trainer

    torch.set_num_threads(threads)
    out_p = Path(out).resolve()
    t0 = time.perf_counter()
    train_url, val_url = write_digits_shards(str(out_p / "data"), image_size=32)
    run_dir = out_p / "run"
    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.train_manifest={train_url}", f"data.val_manifest={val_url}",
                             f"train.run_dir={run_dir}", f"train.num_steps={steps}", *(overrides or [])])
    result = build_trainer(cfg, DistEnv()).fit()
    t_train = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"demo pretraining stopped early ({result.reason}); rerun `largessl demo` to continue")

    train_m, val_m = read_manifest(train_url), read_manifest(val_url)
    state, _, _ = load_model_state(run_dir)
    trained = build_method(cfg.method, build_backbone(cfg.model))
    trained.load_state_dict(state)
    torch.manual_seed(cfg.train.seed + 1)
    random_init = build_backbone(cfg.model)
    rows = {"random init": evaluate_encoder(random_init, cfg, train_m, val_m, linear_epochs),
            "Barlow Twins": evaluate_encoder(trained.backbone, cfg, train_m, val_m, linear_epochs)}
    k = cfg.eval.knn_k[0]
    lines = [f"{'encoder (resnet18, 32 px)':<28}{f'kNN top-1 (k={k})':>18}{'linear top-1':>15}"]
    for name, r in rows.items():
        lines.append(f"{name:<28}{r['knn_top1']:>17.1f}%{r['linear_top1']:>14.1f}%")
    gain = rows["Barlow Twins"]["knn_top1"] - rows["random init"]["knn_top1"]
    print("\n".join(["", *lines, "",
                     f"kNN gain over random init: {gain:+.1f} points ({steps} steps, "
                     f"{t_train / 60:.1f} min incl. shards; total {(time.perf_counter() - t0) / 60:.1f} min)",
                     f"run directory: {run_dir}",
                     f"TensorBoard:   tensorboard --logdir {run_dir / 'tb'}", ""]))
    return {"rows": rows, "knn_gain": gain, "run_dir": str(run_dir), "steps": steps}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl demo``."""
    logging.getLogger().handlers.clear()  # replace the CLI's default handler by the rank-aware one
    setup_logging(DistEnv(), "INFO")
    run_demo(args.out, args.steps, args.threads, args.linear_epochs, args.overrides)
    return 0
