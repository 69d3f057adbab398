"""``largessl bench step``: images/s of the real SSL training step on device-resident synthetic batches.

Three variants are measured in one run, each after untimed warm-up steps, each timed with one device
sync before and one after the timed loop (none inside it):

- **ours**: the trainer's own setup and step — :class:`largessl.train.trainer.Trainer` builds the model,
  optimizer, precision policy (bf16 autocast with fp32 statistics and losses, channels_last,
  optional torch.compile) and DDP/DeepSpeed wrapping; :func:`largessl.train.step.train_step` runs
  each step. Nothing here re-implements the step.
- **reference**: a BASELINE written the way the anchor implementations do it (see
  :class:`ReferenceBarlowTwins`): fp16 autocast around everything including the loss, a GradScaler,
  NCHW tensors, a per-rank BatchNorm1d on the embeddings, C divided by the configured batch size and
  summed with a raw all-reduce (no gradient through it), a per-parameter Python-loop LARS.
  Never used for training.
- **floor**: forward + backward of the backbone alone on all views of the batch stacked together
  (2× the images for two views), same precision and layout as *ours*, no head, loss or optimizer:
  the compute floor the SSL step is compared with.

Images are SSL images: one image = ``data.num_views`` views. ``images_per_s`` is per rank. On CUDA each
variant also reports ``host_syncs_per_step``: host-blocking calls in one extra step, counted by
:class:`largessl.nn.host_sync.HostSyncCounter` on any device (on CUDA also by CUDA's sync debug mode; the
larger count is kept). The hot path of *ours* should have none (bar DBN's ``linalg.eigh``, see
docs/benchmarks.md); the reference's GradScaler has at least one.
Also measured: the loss+collective share of the *ours* step — forward and backward of the method's
loss on fixed embeddings (its all-reduces/all-gathers included), timed on its own and divided by the
step time. The issue's goals (≥ 1.5× reference, ≤ 1.15× floor, loss share < 10 %) are judged only
on CUDA; a CPU run is a smoke run of the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.optim import Optimizer

from largessl.config import Config, load_config
from largessl.data.batch import Batch
from largessl.distributed.collectives import all_reduce_sum_no_grad, get_rank, get_world_size
from largessl.distributed.env import DistEnv, detect_env
from largessl.methods.base import backbone_features
from largessl.methods.heads import parse_dims
from largessl.models import build_backbone, prefers_channels_last
from largessl.run.precision import PrecisionPolicy, resolve_device, resolve_precision
from largessl.train.schedules import apply_lr
from largessl.train.step import train_step

log = logging.getLogger(__name__)

GOALS = {"speedup_vs_reference_min": 1.5, "step_over_floor_max": 1.15, "loss_share_max": 0.10}
"""The issue's targets (benchmarks, not tests): judged on CUDA runs only."""

VARIANTS = ("ours", "reference", "floor")


# ---------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    """Timing of one variant: ``steps`` timed steps of ``images_per_step`` SSL images each (per rank)."""

    name: str
    images_per_step: int
    steps: int
    seconds: float
    precision: str
    channels_last: bool
    peak_memory_mb: float | None
    """CUDA max allocated during warm-up and timed steps; None on CPU (see the report's host_peak_rss_mb)."""
    notes: str = ""
    host_syncs_per_step: int | None = None
    """Host syncs in one step after the timed ones (see :func:`count_host_syncs`), on CPU too."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        """Mean wall time of one step in milliseconds."""
        return 1000.0 * self.seconds / self.steps

    @property
    def images_per_s(self) -> float:
        """SSL images per second on this rank."""
        return self.images_per_step * self.steps / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record including the derived rates."""
        d = asdict(self)
        d.update(ms_per_step=self.ms_per_step, images_per_s=self.images_per_s)
        return d


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[int], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls ``fn(i)`` after ``warmup`` untimed calls; one sync at each end, none between.

    On CUDA the interval is measured with CUDA events recorded on the stream, so host-side launch time
    that overlaps GPU work is not counted twice and a host stall that starves the GPU is counted.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")
    for i in range(warmup):
        fn(i)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(warmup, warmup + steps):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    return time.perf_counter() - t0


def count_host_syncs(fn: Callable[[int], Any], device: torch.device, i: int = 0) -> int:
    """Host syncs made by one ``fn(i)``, on any device: :class:`~largessl.nn.host_sync.HostSyncCounter` (the
    ops that block the host on CUDA, counted on the CPU too); on CUDA the larger of that and CUDA's own
    sync debug mode (a prototype that may miss some syncs, e.g. inside library kernels, but never over-counts).

    The hot path should make none: each one stalls the host until the GPU drains its queue, so the next
    kernels are launched late.
    """
    from largessl.nn.host_sync import HostSyncCounter

    cuda = device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else 0
    with warnings.catch_warnings(record=True) as caught, HostSyncCounter(device) as counter:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(i)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous)
    cuda_count = sum(1 for w in caught if "synchroniz" in str(w.message))
    return max(counter.total, cuda_count)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset, in MiB; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def mean_over_ranks(value: float, device: torch.device, group: ProcessGroup | None = None) -> float:
    """Mean of a per-rank number over ``group`` (SUM then divide; a sync point, used once per variant)."""
    world = get_world_size(group)
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    all_reduce_sum_no_grad(t, group)
    return float(t.item()) / world


def free_memory(device: torch.device) -> None:
    """Drop the previous variant's tensors before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synthetic_views(num_views: int, batch_size: int, image_size: int, device: torch.device,
                    channels_last: bool, seed: int = 0) -> list[torch.Tensor]:
    """``num_views`` device-resident (B, 3, H, W) normal tensors, made once so no copy is timed."""
    g = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(batch_size, 3, image_size, image_size, generator=g, device=device)
            .contiguous(memory_format=fmt) for _ in range(num_views)]


# ---------------------------------------------------------------------------------------------------
# ours: the trainer's model, optimizer and step


class _NoDataStream:
    """What Trainer needs to plan a run when the batches come from the benchmark, not from shards."""

    num_classes = 0  # no online probe: it is not part of the SSL step being measured

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Never used: the benchmark feeds synthetic views to the step directly."""
        raise RuntimeError("the step benchmark feeds synthetic batches; it has no data stream")


def bench_config(cfg: Config, per_rank_batch_size: int, world_size: int, run_dir: str) -> Config:
    """A copy of ``cfg`` with the benchmark's batch and a throw-away run directory (nothing is saved there)."""
    if per_rank_batch_size < 1:
        raise ValueError(f"--per-rank-batch-size must be >= 1 (got {per_rank_batch_size})")
    cfg = copy.deepcopy(cfg)
    cfg.train.global_batch_size = per_rank_batch_size * world_size
    cfg.train.run_dir = run_dir
    cfg.checkpoint.dir = ""
    cfg.train.num_steps = max(cfg.train.num_steps, 1)
    cfg.validate()
    return cfg


def build_synthetic_trainer(cfg: Config, env: DistEnv, group: ProcessGroup | None = None) -> Any:
    """The real :class:`~largessl.train.trainer.Trainer` (model, optimizer, policy, DDP) over no data."""
    from largessl.train.trainer import Trainer

    batches = 10_000
    return Trainer(cfg, env, _NoDataStream(batches), batches * cfg.train.global_batch_size, group)


def trainer_step_fn(trainer: Any, views: list[torch.Tensor]) -> Callable[[int], None]:
    """One step of the trainer's hot path: lr from the schedule, then ``train_step``; no host sync."""
    cfg, plan = trainer.cfg, trainer.plan

    def step(i: int) -> None:
        apply_lr(trainer.optimizer, i % plan.num_steps, plan.warmup_steps, plan.num_steps, cfg.optim.final_lr_ratio)
        train_step(trainer.model, views, i, trainer.optimizer, trainer.policy, trainer.scaler, cfg.train.grad_clip,
                   trainer.engine)

    return step


def measure_ours(trainer: Any, views: list[torch.Tensor], steps: int, warmup: int) -> Measurement:
    """Time the trainer's step on ``views``."""
    device, policy = trainer.device, trainer.policy
    trainer.model.train()
    reset_peak_memory(device)
    fn = trainer_step_fn(trainer, views)
    seconds = time_steps(fn, steps, warmup, device)
    peak = peak_memory_mb(device)
    seconds = mean_over_ranks(seconds, device, trainer.group)
    return Measurement("ours", views[0].shape[0], steps, seconds, policy.name, policy.channels_last, peak,
                       notes="Trainer + train_step" + (" (torch.compile)" if policy.compile else ""),
                       host_syncs_per_step=count_host_syncs(fn, device, warmup + steps))


def _bt_loss(module: nn.Module, z: list[torch.Tensor]) -> torch.Tensor:
    from largessl.methods import barlow_twins

    c = module.cfg
    return barlow_twins.loss(z[0], z[1], c.lambd, module.group, c.collective, c.eps)[0]


def _vicreg_loss(module: nn.Module, z: list[torch.Tensor]) -> torch.Tensor:
    from largessl.methods import vicreg

    c = module.cfg
    return vicreg.loss(z[0], z[1], c.sim_coeff, c.std_coeff, c.cov_coeff, module.group, c.gamma, c.eps,
                       c.collective)[0]


LOSS_TIMERS: dict[str, Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]] = {
    "barlow_twins": _bt_loss,
    "vicreg": _vicreg_loss,
}
"""Methods whose loss is a function of the two projector outputs, so it can be timed on its own."""


def measure_loss(trainer: Any, views: list[torch.Tensor], steps: int, warmup: int) -> dict[str, Any]:
    """Forward+backward of the method's loss (with its collectives) on fixed embeddings, ms per call."""
    module = trainer.module
    name = module.cfg.name
    if name not in LOSS_TIMERS:
        return {"loss_ms": None, "note": f"no separate loss timer for method {name!r} "
                                         f"(available: {', '.join(LOSS_TIMERS)})"}
    device, policy = trainer.device, trainer.policy
    with torch.no_grad(), policy.autocast():
        z = [module.projector(backbone_features(module.backbone, v)) for v in views[:2]]
    # The embeddings keep the step's dtype (bf16/fp16 under autocast); the loss casts them itself.
    z = [t.detach().requires_grad_(True) for t in z]
    fn = LOSS_TIMERS[name]

    def call(_: int) -> None:
        with policy.autocast():
            loss = fn(module, z)
        loss.backward()
        for t in z:
            t.grad = None

    seconds = mean_over_ranks(time_steps(call, steps, warmup, device), device, trainer.group)
    return {"loss_ms": 1000.0 * seconds / steps, "embedding_dim": int(z[0].shape[1]),
            "embedding_dtype": str(z[0].dtype).replace("torch.", ""),
            "note": "forward+backward of the loss on fixed embeddings, collectives included"}


# ---------------------------------------------------------------------------------------------------
# reference: the anchor implementations' step (BASELINE ONLY)


class ReferenceBarlowTwins(nn.Module):
    """BASELINE ONLY — Barlow Twins as the anchor code writes it, kept naive on purpose for comparison.

    Per-rank ``BatchNorm1d`` standardisation of the embeddings, C = bn(z1)ᵀ bn(z2) computed inside the
    caller's fp16 autocast, divided by the configured global batch size and summed over ranks with a
    raw in-place all-reduce: the gradient of C is not reduced, which is what the anchors do.
    """

    def __init__(self, backbone: nn.Module, dims: list[int], lambd: float, global_batch_size: int,
                 group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        prev = int(backbone.num_features)
        for d in dims[:-1]:
            layers += [nn.Linear(prev, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
            prev = d
        layers.append(nn.Linear(prev, dims[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(dims[-1], affine=False)
        self.lambd = lambd
        self.global_batch_size = global_batch_size
        self.group = group

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """The Barlow Twins loss of one pair of views, all of it under the caller's autocast."""
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2)
        c = c / self.global_batch_size
        # The anchors' raw in-place all-reduce: the values of C become global, autograd never sees it (so the
        # gradient stays local). Reducing through a detached alias of C's storage is exactly that, warning-free.
        all_reduce_sum_no_grad(c.detach(), self.group)
        diag = torch.diagonal(c)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag + self.lambd * off_diag


class ReferenceLARS(Optimizer):
    """BASELINE ONLY — LARS as a plain ``torch.optim`` loop: several small kernels per parameter per step.

    Parameters with one dimension (biases, BN) get neither weight decay nor the trust ratio.
    """

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One LARS update of every parameter with a gradient."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(u_norm > 0, g["eta"] * p_norm / u_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def reference_step_fn(model: nn.Module, optimizer: Optimizer, scaler: torch.amp.GradScaler | None,
                      views: list[torch.Tensor], device: torch.device) -> Callable[[int], None]:
    """The anchors' step: fp16 autocast over forward and loss, GradScaler (its inf check syncs every step)."""
    fp16 = device.type == "cuda"

    def step(_: int) -> None:
        optimizer.zero_grad()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16):
            loss = model(views[0], views[1])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return step


def measure_reference(cfg: Config, device: torch.device, batch_size: int, image_size: int, steps: int, warmup: int,
                      group: ProcessGroup | None = None) -> Measurement:
    """Time the BASELINE anchor-style Barlow Twins step (fp16 on CUDA; fp32 on CPU, where fp16 autocast is moot)."""
    world = get_world_size(group)
    torch.manual_seed(cfg.train.seed)
    dims = parse_dims(getattr(cfg.method, "projector", "8192-8192-8192"))
    lambd = float(getattr(cfg.method, "lambd", 5e-3))
    model: nn.Module = ReferenceBarlowTwins(build_backbone(cfg.model), dims, lambd, batch_size * world, group)
    model = model.to(device)
    if device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index], process_group=group)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model, process_group=group)
    scale = batch_size * world / 256
    weights = [p for p in model.parameters() if p.ndim != 1]
    bias_norm = [p for p in model.parameters() if p.ndim == 1]
    opt = ReferenceLARS([{"params": weights, "lr": cfg.optim.base_lr * scale},
                         {"params": bias_norm, "lr": (cfg.optim.bias_norm_lr or cfg.optim.base_lr) * scale}],
                        lr=cfg.optim.base_lr * scale, weight_decay=cfg.optim.weight_decay,
                        momentum=cfg.optim.momentum, eta=cfg.optim.eta)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    views = synthetic_views(2, batch_size, image_size, device, channels_last=False, seed=1)
    model.train()
    reset_peak_memory(device)
    fn = reference_step_fn(model, opt, scaler, views, device)
    seconds = time_steps(fn, steps, warmup, device)
    peak = peak_memory_mb(device)
    seconds = mean_over_ranks(seconds, device, group)
    precision = "fp16" if device.type == "cuda" else "fp32"
    notes = "anchor-style BASELINE: autocast incl. loss, NCHW, raw all-reduce of C, loop LARS"
    if device.type != "cuda":
        notes += "; fp32 on CPU (the fp16 autocast and GradScaler apply on CUDA)"
    return Measurement("reference", batch_size, steps, seconds, precision, False, peak, notes,
                       host_syncs_per_step=count_host_syncs(fn, device, warmup + steps))


# ---------------------------------------------------------------------------------------------------
# floor: backbone forward+backward only


def measure_floor(cfg: Config, policy: PrecisionPolicy, device: torch.device, batch_size: int, image_size: int,
                  num_views: int, steps: int, warmup: int, group: ProcessGroup | None = None) -> Measurement:
    """Time forward+backward of the backbone alone on ``num_views × batch_size`` images (same policy as ours)."""
    torch.manual_seed(cfg.train.seed)
    backbone: nn.Module = build_backbone(cfg.model).to(device)
    if policy.channels_last and cfg.train.channels_last is None and not prefers_channels_last(backbone):
        policy = dataclasses.replace(policy, channels_last=False)  # the trainer's choice for a ViT (see Trainer)
    if policy.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if policy.compile:
        backbone = torch.compile(backbone)
    backbone.train()
    (x,) = synthetic_views(1, num_views * batch_size, image_size, device, policy.channels_last, seed=2)
    params = list(backbone.parameters())

    def step(_: int) -> None:
        for p in params:
            p.grad = None
        with policy.autocast():
            f = backbone(x)
        # The cheapest scalar that sends a gradient to every feature: the floor has no head and no loss.
        f.float().sum().backward()

    reset_peak_memory(device)
    seconds = time_steps(step, steps, warmup, device)
    peak = peak_memory_mb(device)
    seconds = mean_over_ranks(seconds, device, group)
    return Measurement("floor", batch_size, steps, seconds, policy.name, policy.channels_last, peak,
                       notes=f"backbone fwd+bwd on {num_views}x{batch_size} images, no head/loss/optimizer",
                       host_syncs_per_step=count_host_syncs(step, device, warmup + steps),
                       extra={"backbone_images_per_step": num_views * batch_size})


# ---------------------------------------------------------------------------------------------------
# The benchmark


def describe_device(device: torch.device) -> str:
    """Human name of the device (GPU model, or the CPU and its thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} torch threads)"


def judge_goals(report: dict[str, Any]) -> dict[str, Any]:
    """Compare the measured ratios with :data:`GOALS`; only a CUDA run is judged."""
    if report["device"] != "cuda":
        return {"evaluated": False, "reason": "CPU smoke run: the goals are for GPU runs (bf16, channels_last)"}
    r = report["ratios"]
    out: dict[str, Any] = {"evaluated": True}
    if r.get("speedup_vs_reference") is not None:
        out["speedup_vs_reference"] = r["speedup_vs_reference"] >= GOALS["speedup_vs_reference_min"]
    if r.get("step_over_floor") is not None:
        out["step_over_floor"] = r["step_over_floor"] <= GOALS["step_over_floor_max"]
    if r.get("loss_share") is not None:
        out["loss_share"] = r["loss_share"] <= GOALS["loss_share_max"]
    return out


def compute_ratios(variants: dict[str, dict[str, Any]], loss_ms: float | None) -> dict[str, float | None]:
    """The issue's ratios from measured numbers; None where a variant was not run."""
    ours, ref, floor = (variants.get(k) for k in VARIANTS)
    return {
        "speedup_vs_reference": ours["images_per_s"] / ref["images_per_s"] if ours and ref else None,
        "step_over_floor": ours["ms_per_step"] / floor["ms_per_step"] if ours and floor else None,
        "loss_share": loss_ms / ours["ms_per_step"] if ours and loss_ms is not None else None,
    }


def run_step_bench(cfg: Config, per_rank_batch_size: int, steps: int = 20, warmup: int = 5,
                   variants: tuple[str, ...] = VARIANTS, loss_timing: bool = True, env: DistEnv | None = None,
                   group: ProcessGroup | None = None) -> dict[str, Any]:
    """Measure the chosen variants in this process (every rank calls it) and return the report."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown or no variants {unknown or variants}; choose from {', '.join(VARIANTS)}")
    env = env or detect_env()
    world = get_world_size(group)
    results: dict[str, dict[str, Any]] = {}
    loss_info: dict[str, Any] = {"loss_ms": None, "note": "not measured"}
    with tempfile.TemporaryDirectory(prefix="largessl-bench-") as tmp:
        bcfg = bench_config(cfg, per_rank_batch_size, world, tmp)
        device = resolve_device(bcfg.train.device, env.local_rank)
        policy = resolve_precision(bcfg.train, device)
        image_size, num_views = bcfg.data.image_size, bcfg.data.num_views
        if "ours" in variants:
            trainer = build_synthetic_trainer(bcfg, env, group)
            views = synthetic_views(num_views, per_rank_batch_size, image_size, trainer.device,
                                    trainer.policy.channels_last)
            results["ours"] = measure_ours(trainer, views, steps, warmup).to_dict()
            if loss_timing:
                loss_info = measure_loss(trainer, views, steps, warmup)
            del trainer, views
            free_memory(device)
        if "floor" in variants:
            results["floor"] = measure_floor(bcfg, policy, device, per_rank_batch_size, image_size, num_views,
                                             steps, warmup, group).to_dict()
            free_memory(device)
        if "reference" in variants:
            results["reference"] = measure_reference(bcfg, device, per_rank_batch_size, image_size, steps, warmup,
                                                     group).to_dict()
            free_memory(device)
    report: dict[str, Any] = {
        "bench": "step",
        "device": device.type,
        "device_name": describe_device(device),
        "torch": torch.__version__,
        "world_size": world,
        "per_rank_batch_size": per_rank_batch_size,
        "num_views": num_views,
        "image_size": image_size,
        "arch": bcfg.model.arch,
        "method": bcfg.method.name,
        "projector": getattr(bcfg.method, "projector", None),
        "optimizer": bcfg.optim.name,
        "strategy": bcfg.dist.strategy,
        "steps": steps,
        "warmup_steps": warmup,
        "variants": results,
        "loss": loss_info,
        "host_peak_rss_mb": host_peak_rss_mb(),
    }
    report["ratios"] = compute_ratios(results, loss_info.get("loss_ms"))
    report["global_images_per_s"] = {k: v["images_per_s"] * world for k, v in results.items()}
    report["goals"] = {**GOALS, **judge_goals(report)}
    return report


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_step_report(report: dict[str, Any]) -> str:
    """A human-readable table of a :func:`run_step_bench` report."""
    lines = [
        f"largessl bench step: {report['device_name']} ({report['device']}), {report['world_size']} rank(s), "
        f"{report['per_rank_batch_size']} images/rank x {report['num_views']} views @ {report['image_size']} px, "
        f"{report['arch']} + {report['method']} {report['projector'] or ''}".rstrip(),
        f"{'variant':<10} {'precision':<9} {'layout':<6} {'ms/step':>9} {'images/s/rank':>14} {'peak MiB':>9} "
        f"{'syncs':>5}  notes",
    ]
    for name, m in report["variants"].items():
        lines.append(f"{name:<10} {m['precision']:<9} {'NHWC' if m['channels_last'] else 'NCHW':<6} "
                     f"{m['ms_per_step']:>9.2f} {m['images_per_s']:>14.1f} {_fmt(m['peak_memory_mb'], '.0f'):>9} "
                     f"{_fmt(m['host_syncs_per_step'], 'd'):>5}  {m['notes']}")
    if report["device"] != "cuda":
        lines.append(f"(peak memory is a CUDA figure; host peak RSS of this process: {report['host_peak_rss_mb']:.0f} MiB)")
    r, g, loss = report["ratios"], report["goals"], report["loss"]
    if loss.get("loss_ms") is not None:
        lines.append(f"loss+collective: {loss['loss_ms']:.2f} ms per step = {_fmt(r['loss_share'], '.1%')} of the "
                     f"ours step (goal <= {g['loss_share_max']:.0%})")
    elif loss.get("note"):
        lines.append(f"loss+collective: {loss['note']}")
    lines.append(f"speed-up of ours over reference: {_fmt(r['speedup_vs_reference'], '.2f')}x "
                 f"(goal >= {g['speedup_vs_reference_min']})")
    lines.append(f"ours step time / backbone floor: {_fmt(r['step_over_floor'], '.3f')}x "
                 f"(goal <= {g['step_over_floor_max']})")
    if not g["evaluated"]:
        lines.append(f"goals not judged: {g['reason']}")
    else:
        lines.append("goals met: " + ", ".join(f"{k}={v}" for k, v in g.items() if isinstance(v, bool)
                                                and k != "evaluated"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``bench step`` and ``bench e2e``."""
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.arch=resnet18 train.compile=true")
    p.add_argument("--per-rank-batch-size", type=int, default=256,
                   help="images per rank per step (sets train.global_batch_size = this x world size; default 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (cuDNN autotune, compile)")
    p.add_argument("--json", default="", help="also write the report as JSON to this path (rank 0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl bench step``."""
    add_common_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--no-loss-timing", action="store_true", help="skip the separate loss+collective timing")


@contextlib.contextmanager
def bench_process_group(cfg: Config) -> Iterator[DistEnv]:
    """Join the job's process group for a benchmark (torchrun/SLURM env, or one process) and leave it after."""
    from largessl.distributed.env import (
        init_distributed,
        resolve_backend,
        setup_logging,
        shutdown_distributed,
    )

    env = detect_env()
    setup_logging(env, cfg.log.level)
    device = resolve_device(cfg.train.device, env.local_rank)
    init_distributed(env, resolve_backend(cfg.dist.backend, device), cfg.dist.timeout_minutes,
                     cfg.dist.rendezvous_timeout_minutes, device)
    try:
        yield env
    finally:
        shutdown_distributed()


def emit_report(report: dict[str, Any], text: str, json_path: str) -> None:
    """Print the table and write the JSON on rank 0 (CLI output, not library logging)."""
    if get_rank() != 0:
        return
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


def run(args: argparse.Namespace) -> int:
    """Run ``largessl bench step`` and print its report."""
    cfg = load_config(args.config, args.overrides)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    with bench_process_group(cfg) as env:
        report = run_step_bench(cfg, args.per_rank_batch_size, args.steps, args.warmup, variants,
                                not args.no_loss_timing, env)
        emit_report(report, format_step_report(report), args.json)
    return 0


def count_step_host_syncs(trainer: Any, batches: Iterator[Any], steps: int, warmup: int = 1,
                     count_data: bool = True) -> list[dict[str, int]]:
    """Host syncs (see :mod:`largessl.nn.host_sync`) of each of ``steps`` training steps after ``warmup``:
    :meth:`~largessl.train.trainer.Trainer.hot_step` plus, with ``count_data``, taking the next batch from
    ``batches`` (the main process's share of the data path, e.g. the ``data.decode=gpu`` stage). Log and save
    steps' extras are not part of it. The first steps may sync (lazy set-up such as a DBN's group size)."""
    from largessl.nn.host_sync import HostSyncCounter

    trainer.model.train()
    per_step: list[dict[str, int]] = []
    for i in range(warmup + steps):
        with HostSyncCounter(trainer.device) as counter:
            counter.enabled = count_data
            batch = next(batches)
            counter.enabled = True
            trainer.hot_step(batch)
        trainer.step += 1
        if i >= warmup:
            per_step.append(dict(counter.counts))
    return per_step
