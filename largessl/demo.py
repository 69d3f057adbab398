"""``largessl demo``: embedded shards → Barlow Twins on a ResNet-18 → kNN / linear probe vs random init.

Runs on a fresh machine with no data and no network. The default data, photodigits (docs/data.md), blends
scikit-learn's bundled digit glyphs with patches of scikit-image's bundled photographs, split by glyph and by
photograph; ``--data digits`` takes the 8×8 digits alone (a random encoder already scores 95% kNN there). The
images become 32 px JPEG WebDataset shards, a ResNet-18 is pretrained for a few minutes on CPU, and its frozen
features are compared with two random-init baselines of the same architecture: the encoder exactly as
pretraining starts from it (same seed, same zero-init residual branches; what ``largessl eval --checkpoint
random`` measures) and torchvision's default initialisation (same seed), the strongest honest baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch

from largessl.config import Config, load_config
from largessl.distributed.env import DistEnv, setup_logging

log = logging.getLogger(__name__)

DEMO_OVERRIDES = [
    "model.arch=resnet18", "model.small_input=false",
    "method.name=barlow_twins", "method.projector=1024-1024", "method.lambd=0.005",
    "data.augment=digits", "data.min_scale=0.8", "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=500",
    "data.pin_memory=false",
    "optim.name=lars", "optim.base_lr=0.8", "optim.bias_norm_lr=0.01", "optim.weight_decay=0.00001",
    "optim.warmup_epochs=1", "optim.final_lr_ratio=0.01",
    "train.global_batch_size=128", "train.device=cpu", "train.log_every=10", "train.collapse_every=50",
    "checkpoint.every_steps=100", "checkpoint.at_epoch_end=false",
    "eval.knn_k=[20]", "eval.online_probe=true", "eval.cache_features=true", "eval.linear_lr=0.1",
    "eval.linear_weight_decay=0.0", "eval.linear_normalize=true",
]
"""The embedded demo recipe (configs/demo_digits.yaml holds the same values for reading)."""
DATASETS = ("photodigits", "digits")
"""Embedded datasets the demo can pretrain on (largessl.data.photodigits, the default / largessl.data.digits)."""
DEFAULT_STEPS = {"photodigits": 400, "digits": 150}
"""Pretraining steps per dataset (about 4.5 and 1 minutes on 2 cores, shards and evaluations included)."""
DEMO_MODEL = "demo-bt-resnet18-{data}"
"""Hub name of the demo's backbone (each run pushes a new timestamped version)."""
DATA_NOTE = {
    "photodigits": "digits over photographs, split by glyph and by photograph",
    "digits": "8x8 digits are easy for random conv features",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl demo``."""
    p.add_argument("--out", default="demo-out", help="folder for shards and the run directory (default demo-out)")
    p.add_argument("--steps", type=int, default=None,
                   help="pretraining steps (default 400 on photodigits, about 4.5 min on 2 cores; 150 on digits)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training (default 2)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs on cached features")
    p.add_argument("--data", choices=DATASETS, default="photodigits",
                   help="embedded dataset (docs/data.md): photodigits (digits over photographs, the default), or "
                        "sklearn's digits (a random encoder already scores 95%% kNN there)")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides")


def initial_backbone(cfg: Config, zero_init_residual: bool | None = None) -> torch.nn.Module:
    """The backbone exactly as pretraining with ``cfg`` starts from it: ``train.seed``, then ``model.*``.

    The trainer seeds with ``train.seed`` and builds the backbone before anything else draws random numbers,
    so this is its step-0 backbone (tests/integration/test_demo.py compares them). ``zero_init_residual``
    overrides ``model.zero_init_residual`` (False = torchvision's default init, same seed).
    """
    from largessl.models import build_backbone

    model_cfg = dataclasses.replace(cfg.model, sync_bn=False)  # same weights; plain BN evaluates on CPU
    if zero_init_residual is not None:
        model_cfg = dataclasses.replace(model_cfg, zero_init_residual=zero_init_residual)
    torch.manual_seed(cfg.train.seed)
    return build_backbone(model_cfg)


def demo_config(out: str | Path, steps: int, linear_epochs: int = 100, overrides: list[str] | None = None,
                train_url: str = "", val_url: str = "") -> Config:
    """The demo's resolved config: the embedded recipe, the shard manifests, the run directory, the lengths."""
    run_dir = Path(out).resolve() / "run"
    return load_config(None, [*DEMO_OVERRIDES, f"data.train_manifest={train_url}", f"data.val_manifest={val_url}",
                              f"train.run_dir={run_dir}", f"train.num_steps={steps}",
                              f"eval.linear_epochs={linear_epochs}", *(overrides or [])])


def evaluate_encoder(cfg, backbone: torch.nn.Module, description: dict, out_dir: Path) -> dict:
    """kNN and linear-probe top-1 (%) of a frozen backbone on the digits val split, via the eval stages.

    Results land in ``out_dir/eval/{knn,linear}.json`` (for the trained run they go into the model card).
    """
    from largessl.eval.runner import evaluate_knn, evaluate_linear
    from largessl.eval.source import EvalSource

    source = EvalSource(backbone.eval(), description)
    device = torch.device("cpu")
    knn = evaluate_knn(cfg, source, out_dir, device)
    lin = evaluate_linear(cfg, source, out_dir, device)
    k = str(cfg.eval.knn_k[0])
    return {"knn_top1": float(knn["top1"][k]), "linear_top1": float(lin["top1"])}


def embedded_shards(data: str, dest: str) -> tuple[str, str]:
    """Write (or reuse) the embedded dataset ``data`` at 32 px under ``dest``; its train and val manifest URLs."""
    if data == "digits":
        from largessl.data.digits import write_digits_shards

        return write_digits_shards(dest, image_size=32)
    if data == "photodigits":
        from largessl.data.photodigits import write_photodigits_shards

        return write_photodigits_shards(dest, image_size=32)
    raise ValueError(f"unknown demo dataset {data!r}; choose one of {', '.join(DATASETS)}")


def run_demo(out: str, steps: int | None = None, threads: int = 2, linear_epochs: int = 100,
             overrides: list[str] | None = None, push: bool = True, data: str = DATASETS[0]) -> dict:
    """Build shards, pretrain, evaluate both encoders, push to a local hub; returns the results (also printed)."""
    from largessl.hub.export import push_run
    from largessl.hub.weights import load_backbone_from_checkpoint
    from largessl.train.trainer import build_trainer

    if data not in DATASETS:
        raise ValueError(f"unknown demo dataset {data!r}; choose one of {', '.join(DATASETS)}")
    steps = DEFAULT_STEPS[data] if steps is None else steps
    torch.set_num_threads(threads)
    out_p = Path(out).resolve()
    t0 = time.perf_counter()
    train_url, val_url = embedded_shards(data, str(out_p / "data" if data == "digits" else out_p / f"data-{data}"))
    cfg = demo_config(out_p, steps, linear_epochs, overrides, train_url, val_url)
    run_dir = Path(cfg.train.run_dir)
    result = build_trainer(cfg, DistEnv()).fit()
    t_train = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"demo pretraining stopped early ({result.reason}); rerun `largessl demo` to continue")

    trained, _, meta = load_backbone_from_checkpoint(run_dir)
    seed = cfg.train.seed
    rows = {"random init (as trained)": evaluate_encoder(cfg, initial_backbone(cfg), {
                "random_init": True, "seed": seed, "zero_init_residual": cfg.model.zero_init_residual},
                out_p / "random-init"),
            "random init (torchvision)": evaluate_encoder(cfg, initial_backbone(cfg, zero_init_residual=False), {
                "random_init": True, "seed": seed, "zero_init_residual": False}, out_p / "random-init-torchvision"),
            "Barlow Twins": evaluate_encoder(cfg, trained, {"checkpoint": str(meta.get("path", run_dir))}, run_dir)}
    k = cfg.eval.knn_k[0]
    lines = [f"{'encoder (resnet18, 32 px)':<28}{f'kNN top-1 (k={k})':>18}{'linear top-1':>15}"]
    for name, r in rows.items():
        lines.append(f"{name:<28}{r['knn_top1']:>17.1f}%{r['linear_top1']:>14.1f}%")
    gain = rows["Barlow Twins"]["knn_top1"] - rows["random init (as trained)"]["knn_top1"]
    gain_tv = rows["Barlow Twins"]["knn_top1"] - rows["random init (torchvision)"]["knn_top1"]
    gain_tv_linear = rows["Barlow Twins"]["linear_top1"] - rows["random init (torchvision)"]["linear_top1"]
    text = ["", f"data: {data} ({DATA_NOTE[data]}), train.seed {seed}", *lines, "",
            f"kNN gain: {gain:+.1f} points over the encoder pretraining started from (zero-init residual "
            f"branches), {gain_tv:+.1f} over torchvision's default init of the same seed; linear gain over "
            f"torchvision's init: {gain_tv_linear:+.1f} points",
            f"pretraining: {steps} steps, "
            f"{t_train / 60:.1f} min incl. shards; total {(time.perf_counter() - t0) / 60:.1f} min",
            f"run directory: {run_dir}",
            f"TensorBoard:   tensorboard --logdir {run_dir / 'tb'}"]
    card = None
    if push:
        hub_dir = out_p / "hub"
        card = push_run(run_dir, str(hub_dir), name=DEMO_MODEL.format(data=data))
        ref = f"{card['name']}@{card['version']}"
        text += [f"hub:           pushed {ref} to {hub_dir} (index: {hub_dir / 'index.html'})",
                 f"load it:       python -c \"from largessl.hub import load_backbone; "
                 f"print(load_backbone('{ref}', hub='{hub_dir}'))\""]
    print("\n".join([*text, ""]))
    return {"rows": rows, "knn_gain": gain, "knn_gain_torchvision_init": gain_tv,
            "linear_gain_torchvision_init": gain_tv_linear, "run_dir": str(run_dir), "steps": steps, "data": data,
            "hub_ref": f"{card['name']}@{card['version']}" if card else None}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl demo``."""
    logging.getLogger().handlers.clear()  # replace the CLI's default handler by the rank-aware one
    setup_logging(DistEnv(), "INFO")
    run_demo(args.out, args.steps, args.threads, args.linear_epochs, args.overrides, data=args.data)
    return 0
