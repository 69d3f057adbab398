"""Optimisation, training-loop, checkpoint and logging configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    """Optimizer for the backbone and heads."""
    base_lr: float = 0.2
    """Learning rate at a global batch of 256; the used lr is base_lr x global_batch_size / 256 (see scale_lr)."""
    bias_norm_lr: float = 0.0048
    """Base lr of biases and normalisation parameters (Barlow Twins' second group); 0 = same as base_lr."""
    scale_lr: bool = True
    """Scale learning rates linearly with global_batch_size / 256."""
    weight_decay: float = 1.5e-6
    """Weight decay of the weights (and of biases and norms when exclude_bias_norm_from_wd is false)."""
    exclude_bias_norm_from_wd: bool = True
    """No weight decay on biases and normalisation parameters (ndim <= 1), as the Barlow Twins and VICReg
    recipes; false decays every parameter, as SimSiam's reference code does."""
    momentum: float = 0.9
    """Momentum for LARS and SGD."""
    eta: float = 1e-3
    """LARS trust coefficient."""
    betas: list[float] | None = None
    """AdamW betas; None = (0.9, 0.999)."""
    warmup_epochs: float = 10.0
    """Linear warm-up length in epochs."""
    final_lr_ratio: float = 0.001
    """Cosine floor as a fraction of the peak lr."""
    fixed_predictor_lr: bool = False
    """Keep the SimSiam predictor's lr constant (no cosine decay), as in SimSiam."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if self.base_lr <= 0:
            raise ValueError(f"optim.base_lr must be > 0 (got {self.base_lr})")
        if self.weight_decay < 0:
            raise ValueError("optim.weight_decay must be >= 0")
        if self.warmup_epochs < 0:
            raise ValueError("optim.warmup_epochs must be >= 0")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError("optim.final_lr_ratio must be in [0, 1]")
        if self.betas is not None and len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values (got {self.betas})")


@dataclass
class TrainConfig:
    """Length, batch, precision and device of the run."""

    run_dir: str = ""
    """Local run directory (config.yaml, metrics.jsonl, tb/, checkpoints/); rerunning on it resumes. For
    object storage set checkpoint.dir=s3://... (the run directory itself must be a local path). Empty: a new,
    unique folder ``runs/<method>-<arch>-<UTC time>-<random>`` for a single process started by hand (printed at
    start; pass it to resume); launchers derive one at submit time, and a job under torchrun, SLURM or
    Kubernetes must name it, so that its restarts find it."""
    global_batch_size: int = 2048
    """Images per optimizer step summed over all ranks; per-rank batch = global / world size."""
    epochs: float = 100.0
    """Training length in epochs of the train manifest (ignored when num_steps > 0)."""
    num_steps: int = 0
    """Training length in optimizer steps; 0 = derived from epochs."""
    seed: int = 0
    """Seed for parameters, data order, augmentation and permutations."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device; auto = cuda when available."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Backbone autocast dtype; auto = bf16 on GPU (fp16 + GradScaler where bf16 is unsupported), fp32 on
    CPU; bf16 is honoured on CPU too (CPU autocast). Losses and batch statistics stay fp32."""
    channels_last: bool | None = None
    """NHWC memory format for the backbone; None = on for CUDA, off on CPU (true is honoured on CPU)."""
    compile: bool = False
    """torch.compile the backbone in place (``nn.Module.compile``: state_dict keys stay unprefixed)."""
    deterministic: bool = False
    """Deterministic kernels and data order (bitwise-reproducible resume on CPU)."""
    log_every: int = 10
    """Log metrics (metrics.jsonl, TensorBoard) every this many steps."""
    collapse_every: int = 50
    """Compute collapse metrics (std, corr, rank, RankMe, m_o/m_r) every this many steps."""
    collapse_guard: bool = True
    """Stop a run whose collapse metrics stay collapsed (m_o > 0.95 or RankMe < 2.5) for
    ``collapse_guard_patience`` measurements in a row after the warm-up: save, record why, exit 5 (never retried).
    false = train on (largessl repro does so for rows meant to collapse). largessl/train/collapse_guard.py."""
    collapse_guard_patience: int = 3
    """Consecutive collapsed measurements (every ``collapse_every`` steps) before the guard stops the run."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this many minutes of training; 0 = no limit."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    lock_lease_seconds: float = 90.0
    """Lease of the run directory's lock (``run.lock``): a run whose heartbeat (every lease / 6) stopped this long
    ago on another machine is dead, and its lock may be taken over (on the same machine: as soon as its process
    is gone)."""
    allow_resplit: bool = True
    """On resume with a different world size or data.num_workers, continue the epoch on a logged re-split of its
    unread samples (each sample of the epoch still seen once; DDP, and DeepSpeed through its universal checkpoint);
    false = refuse. The same split resumes bit-exactly either way."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if "://" in self.run_dir:
            raise ValueError(f"train.run_dir={self.run_dir} is a URL; the run directory (config.yaml, metrics, "
                             "TensorBoard) must be a local path or one on a shared filesystem: keep checkpoints "
                             "on object storage with checkpoint.dir=s3://bucket/prefix and set train.run_dir "
                             "to a folder")
        if self.global_batch_size < 2:
            raise ValueError(f"train.global_batch_size must be >= 2 (got {self.global_batch_size})")
        if self.num_steps < 0 or self.epochs < 0:
            raise ValueError("train.num_steps and train.epochs must be >= 0")
        if self.num_steps == 0 and self.epochs == 0:
            raise ValueError("set train.epochs or train.num_steps to a positive value")
        if self.lock_lease_seconds <= 0:
            raise ValueError(f"train.lock_lease_seconds must be > 0 (got {self.lock_lease_seconds})")
        if self.log_every < 1 or self.collapse_every < 1:
            raise ValueError("train.log_every and train.collapse_every must be >= 1")
        if self.collapse_guard_patience < 1:
            raise ValueError(f"train.collapse_guard_patience must be >= 1 (got {self.collapse_guard_patience})")


@dataclass
class CheckpointConfig:
    """When and where training state is saved."""

    every_steps: int = 1000
    """Save every this many optimizer steps (and at every epoch end and on signals)."""
    at_epoch_end: bool = True
    """Also save when an epoch ends."""
    keep: int = 2
    """Complete checkpoints kept (at least 2, so a corrupt latest one always has a fallback)."""
    dir: str = ""
    """Checkpoint directory or fsspec URL (s3://bucket/prefix, gs://...); empty = <run_dir>/checkpoints."""
    endpoint_url: str = ""
    """S3 endpoint for checkpoint.dir; empty = data.endpoint_url, else AWS_ENDPOINT_URL from the environment."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if self.every_steps < 1:
            raise ValueError("checkpoint.every_steps must be >= 1")
        if self.keep < 2:
            raise ValueError(f"checkpoint.keep must be >= 2 (got {self.keep}): the previous checkpoint is the fallback")


TRACKERS = ("tensorboard", "mlflow", "wandb")
"""Values of ``log.trackers``."""


@dataclass
class LogConfig:
    """Logging and metric sinks."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of rank 0 (other ranks log warnings and errors only)."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <run_dir>/tb (with ``tensorboard`` in ``log.trackers``)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl: any of tensorboard, mlflow, wandb (largessl/run/trackers.py). Each
    gets every scalar and the resolved config; a resumed run continues the same tracker run; an outage only warns."""
    mlflow_uri: str = ""
    """MLflow tracking URI; empty = MLFLOW_TRACKING_URI from the environment (credentials: MLFLOW_TRACKING_*)."""
    mlflow_experiment: str = "largessl"
    """MLflow experiment the run is logged under (created when missing)."""
    wandb_project: str = "largessl"
    """Weights & Biases project (credentials: WANDB_API_KEY; WANDB_MODE=offline writes under the run dir)."""
    wandb_entity: str = ""
    """Weights & Biases entity (team or user); empty = the API key's default."""
    progress: bool = True
    """Show progress with ETA and throughput on rank 0: a bar on a terminal, else plain log lines."""
    progress_every_s: float = 30.0
    """Seconds between plain progress lines when stderr is not a terminal (SLURM, Kubernetes logs)."""

    def validate(self) -> None:
        """Check the trackers and the progress interval."""
        bad = [t for t in self.trackers if t not in TRACKERS]
        if bad:
            raise ValueError(f"log.trackers: unknown {bad}; allowed: {', '.join(TRACKERS)}")
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"log.trackers names a tracker twice: {self.trackers}")
        if not self.progress_every_s > 0:
            raise ValueError(f"log.progress_every_s must be > 0 (got {self.progress_every_s})")
