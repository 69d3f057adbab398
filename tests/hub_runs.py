"""Hand-made pretraining run directories for hub/eval tests, written with the trainer's checkpoint writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from largessl.config import config_to_dict, load_config, save_config
from largessl.models import ModelConfig, build_backbone
from largessl.run.checkpoint import CheckpointManager, SavePayload


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


_DEEPSPEED_RUN = r'''
import json, os, sys
from pathlib import Path
os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2])
import torch
import torch.distributed as dist
from largessl.config import config_to_dict, load_config, save_config
from largessl.models import ModelConfig, build_backbone
from largessl.run.checkpoint import CheckpointManager, SavePayload
from largessl.train.deepspeed_engine import build_engine, save_engine
from largessl.run.precision import PrecisionPolicy

run = Path(sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = load_config(None, ["model.arch=repro_convnet", f"train.run_dir={run}", "dist.strategy=deepspeed",
                         "dist.zero_stage=2"])
run.mkdir(parents=True, exist_ok=True)
save_config(cfg, run / "config.yaml")
torch.manual_seed(0)
module = torch.nn.Module()
module.backbone = build_backbone(ModelConfig(arch="repro_convnet", zero_init_residual=False))
module.projector = torch.nn.Linear(module.backbone.num_features, 8)
module.forward = lambda x: module.projector(module.backbone(x))
opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
engine = build_engine(module, opt, zero_stage=2, per_rank_batch_size=4, world_size=1, grad_clip=0.0,
                      policy=PrecisionPolicy(torch.float32, False, False, False, "cpu"), device=torch.device("cpu"))
for _ in range(2):
    loss = engine(torch.randn(4, 3, 16, 16)).pow(2).mean()
    engine.backward(loss)
    engine.step()
(run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": float(loss), "skipped_samples": 3}) + "\n")
meta = {"step": 2, "epoch": 1, "git_revision": "feedface", "metrics": {"skipped_samples": 3},
        "config": config_to_dict(cfg), "strategy": "deepspeed", "world_size": 1}
CheckpointManager(str(run / "checkpoints"), keep=2).save(2, SavePayload(
    rank_state={"rank": 0}, model_state=module.state_dict(),
    training_state={"step": 2, "epoch": 1, "optimizer": {}, "scaler": {}}, meta=meta,
    write_extra=lambda staging: save_engine(engine, staging)))
dist.destroy_process_group()
'''


def make_deepspeed_run_dir(run_dir: Path) -> Path:
    """A run dir whose checkpoint holds real DeepSpeed ZeRO-2 files (a subprocess: gloo, CPU, world size 1)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _DEEPSPEED_RUN, str(run_dir), str(port)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"DeepSpeed checkpoint helper failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return run_dir
