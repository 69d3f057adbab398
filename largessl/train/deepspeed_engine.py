"""DeepSpeed wrapping (ZeRO stage 0/1/2), on GPU with NCCL or on CPU with gloo.

The model weights stay fp32 inside DeepSpeed; bf16 comes from the same torch autocast policy as with DDP,
entered inside the module DeepSpeed wraps (DeepSpeed switches an autocast around ``engine(...)`` off, see
:meth:`largessl.run.precision.PrecisionPolicy.autocast_inside`), so the SSL loss and batch statistics stay fp32 exactly as in the DDP path (DeepSpeed's own bf16/fp16 modes
would cast the whole module, batch-norm statistics included). LARS keeps per-layer trust ratios under
ZeRO-1/2 through :func:`largessl.train.optim.attach_zero_layout`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from largessl.run.precision import PrecisionPolicy
from largessl.train.optim import LARS

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
CHECKPOINT_DIR = "deepspeed"
"""Folder of DeepSpeed's files inside a checkpoint."""
_PARTITION_RE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_")

TESTED_DEEPSPEED = ">=0.19,<0.20"
"""The DeepSpeed releases the suite has run on (the ``deepspeed`` extra in pyproject.toml pins the same range).
LARS under ZeRO reads DeepSpeed-private attributes (:func:`check_zero_layout_support`)."""


def is_tested_deepspeed(version: str) -> bool:
    """True when ``version`` (e.g. ``"0.19.8"``, ``"0.19.0+cpu"``) lies in :data:`TESTED_DEEPSPEED`."""
    low, high = (tuple(int(x) for x in bound.lstrip("<>=").split(".")) for bound in TESTED_DEEPSPEED.split(","))
    try:
        release = tuple(int(x) for x in version.split("+")[0].split(".")[:len(low)])
    except ValueError:
        return False
    return low <= release < high


ZERO_LAYOUT_ATTRIBUTES = ("round_robin_bit16_groups", "round_robin_bit16_padding", "partition_size",
                          "single_partition_of_fp32_groups", "real_dp_process_group")
"""DeepSpeed-private attributes of the ZeRO-1/2 optimizer that :func:`attach_zero_layout` reads."""


def check_zero_layout_support(zero_optimizer: Any) -> None:
    """Raise (at start-up, naming the installed DeepSpeed) when ZeRO lacks the partition layout LARS reads."""
    missing = [a for a in ZERO_LAYOUT_ATTRIBUTES if not hasattr(zero_optimizer, a)]
    if not missing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = f"DeepSpeed {version('deepspeed')}"
    except PackageNotFoundError:  # a source checkout on the path has no metadata: still name what we can
        installed = "the installed DeepSpeed (version unknown)"
    raise RuntimeError(
        f"{installed}: its ZeRO optimizer ({type(zero_optimizer).__name__}) lacks {', '.join(missing)}, the "
        f"partition layout LARS reads to keep per-layer trust ratios under ZeRO-1/2. largessl is tested with "
        f"deepspeed{TESTED_DEEPSPEED}: pip install 'deepspeed{TESTED_DEEPSPEED}' (or reinstall "
        "'largessl[deepspeed]'), or run with dist.zero_stage=0 or optim.name=sgd/adamw"
    )


def attach_zero_layout(optimizer: Optimizer, zero_optimizer: Any) -> None:
    """Tell LARS where each layer lies inside the ZeRO-1/2 partition it owns (call after deepspeed.initialize).

    Uses DeepSpeed's ``round_robin_bit16_groups`` / ``round_robin_bit16_padding`` / ``partition_size`` /
    ``single_partition_of_fp32_groups`` / ``real_dp_process_group`` (DeepSpeed-private, stage 1 and 2; tested
    with the releases of :data:`TESTED_DEEPSPEED`): :func:`check_zero_layout_support` fails with
    the installed version when they are missing.
    """
    if not isinstance(optimizer, LARS):
        return
    import torch.distributed as dist

    check_zero_layout_support(zero_optimizer)
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        params = zero_optimizer.round_robin_bit16_groups[i]
        padding = zero_optimizer.round_robin_bit16_padding[i]
        size = int(zero_optimizer.partition_size[i])
        pgroup = zero_optimizer.real_dp_process_group[i]
        start = size * dist.get_rank(group=pgroup)
        end = start + size
        segments = []
        cur = 0
        for layer, (p, pad) in enumerate(zip(params, padding)):
            lo, hi = max(cur, start), min(cur + p.numel(), end)
            if lo < hi:
                segments.append((layer, lo - start, hi - lo))
            cur += p.numel() + pad
        optimizer._zero_layout[id(flat)] = (segments, len(params), pgroup)
    log.info("LARS: per-layer trust ratios kept across %d ZeRO partition group(s)",
             len(zero_optimizer.single_partition_of_fp32_groups))


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


def ensure_process_group(device: torch.device) -> None:
    """A one-member process group when none exists: DeepSpeed asserts a group even for a single GPU.

    The CLI destroys it with the job's group (``shutdown_distributed``); multi-rank jobs already have one.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from largessl.distributed.env import free_port, resolve_backend

    dist.init_process_group(resolve_backend("auto", device), init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    log.info("DeepSpeed on one rank: started a one-member process group")


def build_engine(module: nn.Module, optimizer: Optimizer, zero_stage: int, per_rank_batch_size: int,
                 world_size: int, grad_clip: float, policy: PrecisionPolicy, device: torch.device) -> Any:
    """``deepspeed.initialize`` around our module and optimizer (the process group must already exist)."""
    deepspeed = import_deepspeed(device)
    ensure_process_group(device)
    # DeepSpeed asserts LOCAL_RANK exists; SLURM/Kubernetes launches may only have our detected value.
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0) if device.type == "cuda" else "0")
    config = deepspeed_config(zero_stage, per_rank_batch_size, world_size, grad_clip, policy)
    # Our autocast must start inside the module DeepSpeed wraps: DeepSpeed switches an outer one off.
    policy.autocast_inside(module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if zero_stage in (1, 2):
        attach_zero_layout(optimizer, engine.optimizer)
    log.info("DeepSpeed engine ready: ZeRO stage %d, %d rank(s)", zero_stage, world_size)
    return engine


def save_engine(engine: Any, folder: Path) -> None:
    """Every rank writes its DeepSpeed files under ``folder/deepspeed`` (module states on rank 0, each rank's
    optimizer partition)."""
    engine.save_checkpoint(str(folder / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, save_latest=False)


def files_for_rank(rel: str, rank: int) -> bool:
    """Whether checkpoint file ``rel`` is one that ``rank`` loads: DeepSpeed's shared files (module states,
    the recovery script) and that rank's own ZeRO partition, never the other ranks' partitions.

    ZeRO-1/2 without ``elastic_checkpoint`` (our configuration) reads only its own partition file:
    ``zero_pp_rank_<dp rank>_mp_rank_00_optim_states.pt``.
    """
    if not rel.startswith(CHECKPOINT_DIR + "/"):
        return False
    m = _PARTITION_RE.search(rel)
    return m is None or int(m.group(1)) == rank


def load_engine(engine: Any, folder: str | Path) -> None:
    """Restore module and optimizer partition from ``folder/deepspeed`` on the local file system (DeepSpeed
    finds its files with a glob; :class:`largessl.run.checkpoint.CheckpointManager` stages them there)."""
    path, _ = engine.load_checkpoint(str(Path(folder) / CHECKPOINT_DIR), tag=CHECKPOINT_TAG,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load its state from {folder}/{CHECKPOINT_DIR}")
