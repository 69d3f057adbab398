"""Hand-made pretraining run directories for hub/eval tests, written with the trainer's checkpoint writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from largessl.config import config_to_dict, load_config, save_config
from largessl.models import ModelConfig, build_backbone
from largessl.train.checkpoint import CheckpointManager, SavePayload


def make_run_dir(run_dir: Path, backbone: torch.nn.Module | None = None, overrides: list[str] | None = None,
                 step: int = 30, epoch: int = 3, seed: int = 0, arch: str = "resnet18",
                 small_input: bool = True) -> Path:
    """A run dir with config.yaml, metrics.jsonl and one complete checkpoint (default: resnet18, small input).

    BatchNorm running statistics are randomised (seeded) so that eval-mode features depend on them.
    """
    cfg = load_config(None, [f"model.arch={arch}", f"model.small_input={str(small_input).lower()}",
                             f"train.run_dir={run_dir}", *(overrides or [])])
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if backbone is None:
        torch.manual_seed(seed)
        backbone = build_backbone(ModelConfig(arch=arch, small_input=small_input, zero_init_residual=False))
        with torch.no_grad():
            for m in backbone.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["projector.0.weight"] = torch.randn(8, backbone.num_features)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, step + 1):
            f.write(json.dumps({"step": s, "loss": 100.0 / s, "lr": 0.1, "std": 0.5, "corr": 0.1,
                                "rankme": 7.5}) + "\n")
    meta = {"step": step, "epoch": epoch, "git_revision": "0123456789abcdef", "metrics": {},
            "config": config_to_dict(cfg)}
    mgr = CheckpointManager(str(run_dir / "checkpoints"), keep=2)
    mgr.save(step, SavePayload(rank_state={"rank": 0}, model_state=state,
                               training_state={"step": step, "epoch": epoch}, meta=meta))
    return run_dir
