"""DeepSpeed wrapping (ZeRO stage 0/1/2), on GPU with NCCL or on CPU with gloo.

The model weights stay fp32 inside DeepSpeed; bf16 comes from the same torch autocast policy as with DDP,
entered inside the module DeepSpeed wraps (DeepSpeed switches an autocast around ``engine(...)`` off, see
:meth:`largessl.run.precision.PrecisionPolicy.autocast_inside`), so the SSL loss and batch statistics stay fp32 exactly as in the DDP path (DeepSpeed's own bf16/fp16 modes
would cast the whole module, batch-norm statistics included). LARS keeps per-layer trust ratios under
ZeRO-1/2 through :func:`largessl.train.optim.attach_zero_layout`.

Checkpoints resume on any world size. ZeRO-0 keeps the optimizer whole in the module states file. ZeRO-1/2
partition it per rank: on another world size each rank reads the old partitions overlapping its new share
(:func:`partitions_to_read`, from the layout saved with the checkpoint), writes DeepSpeed's universal checkpoint
for its parameters into its private local copy (:func:`write_universal`) and loads it with DeepSpeed's
``load_universal`` (:func:`load_engine`). A ZeRO stage change is refused by the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from largessl.run.checkpoint import CorruptCheckpointError
from largessl.run.precision import PrecisionPolicy
from largessl.train.optim import LARS

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
CHECKPOINT_DIR = "deepspeed"
"""Folder of DeepSpeed's files inside a checkpoint."""
LAYOUT_FILE = "zero_layout.json"
"""The ZeRO-1/2 partition layout of the saving run, next to DeepSpeed's files (:func:`zero_layout`)."""
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


def zero_layout(zero_optimizer: Any, world_size: int, zero_stage: int) -> dict[str, Any]:
    """Where every parameter lies in the flat ZeRO-1/2 buffers (JSON): per parameter group the partition size of
    one rank and, by parameter name, ``[flat start, numel]``; saved with the checkpoint so that a resume on
    another world size reads only the old partitions its new share overlaps (DeepSpeed-private attributes, the
    same as :func:`attach_zero_layout`)."""
    groups = []
    for i, params in enumerate(zero_optimizer.round_robin_bit16_groups):
        cur, where = 0, {}
        for p, pad in zip(params, zero_optimizer.round_robin_bit16_padding[i]):
            where[zero_optimizer.param_names[p]] = [cur, p.numel()]
            cur += p.numel() + pad
        groups.append({"partition_size": int(zero_optimizer.partition_size[i]), "params": where})
    return {"format": 1, "world_size": world_size, "zero_stage": zero_stage, "groups": groups}


def save_engine(engine: Any, folder: Path) -> None:
    """Every rank writes its DeepSpeed files under ``folder/deepspeed`` (module states on rank 0, each rank's
    optimizer partition); with ZeRO-1/2 rank 0 adds the partition layout (:func:`zero_layout`)."""
    engine.save_checkpoint(str(folder / CHECKPOINT_DIR), tag=CHECKPOINT_TAG, save_latest=False)
    stage = engine.zero_optimization_stage()
    if stage in (1, 2) and engine.global_rank == 0:
        layout = zero_layout(engine.optimizer, engine.dp_world_size, stage)
        (folder / CHECKPOINT_DIR / LAYOUT_FILE).write_text(json.dumps(layout))


def partition_rank(rel: str) -> int | None:
    """The data-parallel rank whose ZeRO optimizer partition checkpoint file ``rel`` is, or None (a shared file)."""
    m = _PARTITION_RE.search(rel)
    return int(m.group(1)) if m else None


def is_shared_file(rel: str) -> bool:
    """Whether checkpoint file ``rel`` is one of DeepSpeed's files that every rank loads: the module states, the
    partition layout, never an optimizer partition (:func:`partitions_to_read` picks those)."""
    return rel.startswith(CHECKPOINT_DIR + "/") and partition_rank(rel) is None


def saved_partitions(files: list[str]) -> dict[int, str]:
    """The ZeRO optimizer partition files of a checkpoint by the rank that wrote them (empty for ZeRO-0)."""
    return {r: rel for rel in files if rel.startswith(CHECKPOINT_DIR + "/") and (r := partition_rank(rel)) is not None}


def partitions_to_read(engine: Any, local_dir: Path, files: list[str]) -> list[str]:
    """The optimizer partition files this rank loads, chosen once the shared files are in ``local_dir``.

    Same world size: its own (``zero_pp_rank_<dp rank>_mp_rank_00_optim_states.pt``; ZeRO-1/2 without
    ``elastic_checkpoint`` reads no other). Another world size: the old partitions that hold a piece of any
    parameter this rank now owns, from the saved layout (:func:`zero_layout`) -- about ``old/new + 1`` files,
    never all of them; every partition when the checkpoint predates the layout file.
    """
    parts = saved_partitions(files)
    if not parts:
        return []
    rank = engine.global_rank
    if len(parts) == engine.dp_world_size:
        return [parts[rank]] if rank in parts else []
    layout_path = local_dir / CHECKPOINT_DIR / LAYOUT_FILE
    if not layout_path.is_file():
        log.warning("the checkpoint has no %s (saved by an older largessl): reading all %d optimizer partitions "
                    "to re-partition them", LAYOUT_FILE, len(parts))
        return sorted(parts.values())
    layout = json.loads(layout_path.read_text())
    if int(layout["world_size"]) != len(parts):
        raise CorruptCheckpointError(f"{LAYOUT_FILE} records {layout['world_size']} rank(s) but the checkpoint "
                                     f"holds {len(parts)} optimizer partitions")
    zero = engine.optimizer
    needed: set[int] = set()
    for i, params in enumerate(zero.bit16_groups):
        group = layout["groups"][i] if i < len(layout["groups"]) else {"params": {}}
        size = int(group.get("partition_size", 1))
        for p in params:
            if p._hp_mapping is None:
                continue  # no piece of this parameter in this rank's new partition
            name = zero.param_names[p]
            if name not in group["params"]:
                raise ValueError(f"parameter {name} (group {i}) is not in the checkpoint's ZeRO layout: the model "
                                 "or its optimizer parameter groups changed since the checkpoint was written")
            start, numel = group["params"][name]
            needed.update(range(start // size, (start + numel - 1) // size + 1))
    return sorted(parts[k] for k in needed if k in parts)


def load_engine(engine: Any, folder: str | Path, saved_world_size: int) -> None:
    """Restore module and optimizer partition from ``folder/deepspeed`` on the local file system (DeepSpeed
    finds its files with a glob; :class:`largessl.run.checkpoint.CheckpointManager` stages them there).

    ZeRO-1/2 saved on another world size goes through DeepSpeed's universal checkpoint: the partitions this rank
    read are turned into per-parameter files (:func:`write_universal`) in this private local copy, and the
    engine loads those with ``load_universal`` (the checkpoint itself is never modified).
    """
    folder = Path(folder)
    universal = engine.zero_optimization_stage() in (1, 2) and saved_world_size != engine.dp_world_size
    if universal:
        write_universal(engine, folder / CHECKPOINT_DIR / CHECKPOINT_TAG)
    config = engine._config  # DeepSpeed reads this flag only while loading; the engine keeps its own config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(str(folder / CHECKPOINT_DIR), tag=CHECKPOINT_TAG,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load its state from {folder}/{CHECKPOINT_DIR}")
    if universal:
        _load_buffers_and_check_weights(engine, folder / CHECKPOINT_DIR / CHECKPOINT_TAG)
        log.info("DeepSpeed ZeRO-%d state of %d rank(s) re-partitioned for %d rank(s) (universal checkpoint)",
                 engine.zero_optimization_stage(), saved_world_size, engine.dp_world_size)


_SHARDED = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")
"""Keys of a ZeRO-1/2 partition file that are one rank's share; the rest is global state."""


def _load_deepspeed_file(path: Path) -> Any:
    """A DeepSpeed checkpoint file (already hash-verified), without unpickling arbitrary objects: only the few
    DeepSpeed types its ZeRO files hold are allowed. Memory-mapped: only the bytes used are read."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def write_universal(engine: Any, state_dir: Path) -> None:
    """Write DeepSpeed's universal checkpoint (``zero/<param>/{fp32,<state key>,step}.pt`` and
    ``zero/optimizer_state.pt``) into ``state_dir`` for the parameters this rank owns under the new partitioning,
    from the old partitions present there (:func:`partitions_to_read`).

    DeepSpeed's ``ds_to_universal`` converts whole checkpoints offline and knows only Adam's ``exp_avg`` /
    ``exp_avg_sq``; this writes the same format for any per-element optimizer state (SGD's ``momentum_buffer``,
    LARS's ``mu``, AdamW's moments, a scalar ``step``), which DeepSpeed's loader takes by file name.
    """
    parts = {r: state_dir / rel.rsplit("/", 1)[-1] for r, rel in
             saved_partitions([f"{CHECKPOINT_DIR}/{p.name}" for p in state_dir.glob("*optim_states.pt")]).items()}
    if not parts:
        raise RuntimeError(f"no ZeRO optimizer partition in {state_dir} to re-partition")
    loaded = {r: _load_deepspeed_file(path)["optimizer_state_dict"] for r, path in sorted(parts.items())}
    stage = engine.zero_optimization_stage()
    saved_stages = {int(sd["zero_stage"]) for sd in loaded.values()}
    if saved_stages != {stage}:
        raise ValueError(f"the checkpoint's optimizer state is ZeRO stage {sorted(saved_stages)}, this run uses "
                         f"stage {stage}: DeepSpeed state resumes only on the stage it was written with")
    zero = engine.optimizer
    out = state_dir / "zero"
    out.mkdir(exist_ok=True)
    for i, params in enumerate(zero.bit16_groups):
        for p in params:
            if p._hp_mapping is None:
                continue
            name = zero.param_names[p]
            pieces: dict[str, list[torch.Tensor]] = {}
            steps = []
            for sd in loaded.values():  # rank order: each rank's piece follows the previous one's
                where = sd["param_slice_mappings"][i].get(name)
                if where is None:
                    continue
                flat = sd["single_partition_of_fp32_groups"][i]
                # the last rank's fp32 partition is saved without the group's alignment padding, its state with it
                padded = (flat.numel(), flat.numel() + int(sd.get("group_paddings", [0] * (i + 1))[i]))
                state = sd["base_optimizer_state"]["state"].get(i, {})
                tensors = {"fp32": flat}
                for key, value in state.items():
                    if key == "step":
                        steps.append(value)
                    elif torch.is_tensor(value) and value.dim() == 1 and value.numel() in padded:
                        tensors[key] = value
                    else:
                        raise ValueError(f"optimizer state {key!r} ({type(value).__name__}) of parameter group {i} is "
                                         "neither per-element nor a step count; DeepSpeed's universal checkpoint "
                                         "cannot re-partition it. Resume on the saved world size")
                if pieces and set(tensors) != set(pieces):
                    raise ValueError(f"optimizer partitions disagree on the state keys of {name}: "
                                     f"{sorted(pieces)} vs {sorted(tensors)}")
                for key, value in tensors.items():
                    pieces.setdefault(key, []).append(value.narrow(0, where.start, where.numel))
            folder = out / name
            folder.mkdir(exist_ok=True)
            for key, chunks in pieces.items():
                full = torch.cat(chunks)
                if full.numel() != p.numel():
                    raise RuntimeError(f"re-partitioning {name}: the partitions read hold {full.numel()} of its "
                                       f"{p.numel()} elements (a partition is missing)")
                torch.save({"param": full.view(p.shape).clone()}, folder / f"{key}.pt")
            if steps:
                if any(not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])) for s in steps):
                    raise RuntimeError(f"optimizer partitions disagree on the step count of {name}: {steps}")
                torch.save(steps[0], folder / "step.pt")
    common = {k: v for k, v in next(iter(loaded.values())).items() if k not in _SHARDED}
    common["param_groups"] = next(iter(loaded.values()))["base_optimizer_state"]["param_groups"]
    torch.save(common, out / "optimizer_state.pt")


def _load_buffers_and_check_weights(engine: Any, state_dir: Path) -> None:
    """After a universal load: restore the module's buffers (batch-norm statistics), which DeepSpeed's universal
    path leaves at their initial values, and check the re-partitioned weights against the saved module states."""
    (states,) = sorted(state_dir.glob("mp_rank_*_model_states.pt"))
    saved = _load_deepspeed_file(states)["module"]
    module = engine.module
    names = set(dict(module.named_parameters())) | set(dict(module.named_buffers()))
    if set(saved) != names:
        raise ValueError(f"the checkpoint's module states differ from this model: missing "
                         f"{sorted(names - set(saved))[:5]}, unexpected {sorted(set(saved) - names)[:5]}")
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(saved[name])
        for name, p in module.named_parameters():
            if not torch.equal(p.detach().cpu(), saved[name].to(p.dtype)):
                raise RuntimeError(f"universal checkpoint load: parameter {name} differs from the saved module "
                                   "state (re-partitioning went wrong); not training on it")
