"""DeepSpeed wrapping (ZeRO stage 0/1/2), on GPU with NCCL or on CPU with gloo.

The model weights stay fp32 inside DeepSpeed; bf16 comes from the same torch autocast region as with DDP,
so the SSL loss and batch statistics stay fp32 exactly as in the DDP path (DeepSpeed's own bf16/fp16 modes
would cast the whole module, batch-norm statistics included). LARS keeps per-layer trust ratios under
ZeRO-1/2 through :func:`largessl.train.optim.attach_zero_layout`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from largessl.train.optim import attach_zero_layout
from largessl.train.precision import PrecisionPolicy

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"

TESTED_DEEPSPEED = ">=0.19,<0.20"
"""The DeepSpeed releases the suite has run on (the ``deepspeed`` extra in pyproject.toml pins the same range).
LARS under ZeRO reads DeepSpeed-private attributes (:func:`largessl.train.optim.check_zero_layout_support`)."""


def is_tested_deepspeed(version: str) -> bool:
    """True when ``version`` (e.g. ``"0.19.8"``, ``"0.19.0+cpu"``) lies in :data:`TESTED_DEEPSPEED`."""
    low, high = (tuple(int(x) for x in bound.lstrip("<>=").split(".")) for bound in TESTED_DEEPSPEED.split(","))
    try:
        release = tuple(int(x) for x in version.split("+")[0].split(".")[:len(low)])
    except ValueError:
        return False
    return low <= release < high


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the accelerator matching ``device`` (DeepSpeed reads DS_ACCELERATOR at import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("dist.strategy=deepspeed needs DeepSpeed: pip install 'largessl[deepspeed]'") from e
    version = str(getattr(deepspeed, "__version__", "unknown"))
    if not is_tested_deepspeed(version):
        log.warning("DeepSpeed %s is outside the tested range deepspeed%s; start-up checks what LARS under "
                    "ZeRO needs, but other behaviour is unverified", version, TESTED_DEEPSPEED)
    return deepspeed


def deepspeed_config(zero_stage: int, per_rank_batch_size: int, world_size: int, grad_clip: float,
                     policy: PrecisionPolicy) -> dict[str, Any]:
    """The DeepSpeed JSON config for our settings."""
    if policy.dtype == torch.float16:
        raise ValueError("train.precision=fp16 is not supported with dist.strategy=deepspeed; use bf16 or fp32")
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": per_rank_batch_size * world_size,
        "zero_optimization": {"stage": zero_stage},
        # LARS and our param-group layout are not in DeepSpeed's list of tested optimizers.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(module: nn.Module, optimizer: Optimizer, zero_stage: int, per_rank_batch_size: int,
                 world_size: int, grad_clip: float, policy: PrecisionPolicy, device: torch.device) -> Any:
    """``deepspeed.initialize`` around our module and optimizer (the process group must already exist)."""
    deepspeed = import_deepspeed(device)
    # DeepSpeed asserts LOCAL_RANK exists; SLURM/Kubernetes launches may only have our detected value.
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0) if device.type == "cuda" else "0")
    config = deepspeed_config(zero_stage, per_rank_batch_size, world_size, grad_clip, policy)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if zero_stage in (1, 2):
        attach_zero_layout(optimizer, engine.optimizer)
    log.info("DeepSpeed engine ready: ZeRO stage %d, %d rank(s)", zero_stage, world_size)
    return engine


def save_engine(engine: Any, staging: Path) -> None:
    """Every rank writes its DeepSpeed files (optimizer partitions; module states on rank 0)."""
    engine.save_checkpoint(str(staging / "deepspeed"), tag=CHECKPOINT_TAG, save_latest=False)


def load_engine(engine: Any, ckpt: str) -> None:
    """Restore module and optimizer partitions from a verified checkpoint folder."""
    path, _ = engine.load_checkpoint(f"{ckpt}/deepspeed", tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load its state from {ckpt}/deepspeed")
