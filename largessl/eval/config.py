"""Evaluation configuration (linear probe, kNN, semi-supervised fine-tuning, online probe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FEATURE_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class FinetuneConfig:
    """Semi-supervised fine-tuning of the whole network on 1% / 10% of the labels (seed 002 Table 2).

    Defaults are Barlow Twins' published recipe (SGD momentum 0.9, batch 256, 20 epochs, cosine, no weight
    decay, lr 0.002 for the backbone and 0.5 for the linear head; RandomResizedCrop + flip as in the
    linear protocol). ``configs/eval_vicreg.yaml`` holds VICReg's (App. C.2).
    """

    percents: list[float] = field(default_factory=lambda: [1.0, 10.0])
    """Label fractions in percent; one fine-tuning run and one ``eval/finetune_<p>pct.json`` each."""
    label_lists: list[str] = field(default_factory=list)
    """Image list files, one per percent (SimCLR's 1percent.txt / 10percent.txt: one file name or shard key
    a line). Empty: subsets are drawn class-balanced from ``seed``."""
    source_root: str = ""
    """ImageFolder the train shards were written from, to map list-file image names to shard keys
    (default: the ``source`` recorded in the train manifest, when it exists on this machine)."""
    subset_manifests: list[str] = field(default_factory=list)
    """Prebuilt subset manifests (``largessl shards subset``), one per percent; they win over lists and seeds."""
    subset_dir: str = ""
    """Where subsets drawn or listed by the stage are written (default ``<out>/eval/subsets``); reused on reruns."""
    seed: int = 0
    """Seed of the class-balanced subset draw (and of the head's initialisation)."""
    epochs: int = 20
    """Fine-tuning epochs over the label subset."""
    batch_size: int = 256
    """Global batch size."""
    backbone_lr: list[float] = field(default_factory=lambda: [0.002])
    """Backbone lr at batch 256 (scaled by batch / 256), one per percent or one for all."""
    head_lr: list[float] = field(default_factory=lambda: [0.5])
    """Linear-head lr at batch 256 (scaled by batch / 256), one per percent or one for all."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay of both parameter groups."""
    layer_decay: float = 1.0
    """Layer-wise lr decay for ViT backbones (BEiT/MAE fine-tuning): block i of L gets backbone_lr x
    decay^(L + 1 - (i + 1)), the patch/position embeddings decay^(L + 1), the final norm backbone_lr. 1.0 = off
    (one backbone group); below 1 needs a backbone with ``blocks`` (timm ViTs)."""

    def lrs(self, index: int) -> tuple[float, float]:
        """(backbone lr, head lr) of the ``index``-th percent."""
        def pick(v: list[float]) -> float:
            return v[index] if len(v) > 1 else v[0]

        return pick(self.backbone_lr), pick(self.head_lr)

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if not self.percents or any(not 0.0 < p <= 100.0 for p in self.percents):
            raise ValueError(f"eval.finetune.percents must be a non-empty list in (0, 100] (got {self.percents})")
        n = len(self.percents)
        for name in ("label_lists", "subset_manifests"):
            v = getattr(self, name)
            if v and len(v) != n:
                raise ValueError(f"eval.finetune.{name} must have one entry per percent ({n}: {self.percents}), "
                                 f"got {len(v)}")
        for name in ("backbone_lr", "head_lr"):
            v = getattr(self, name)
            if len(v) not in (1, n) or any(lr < 0 for lr in v):
                raise ValueError(f"eval.finetune.{name} must hold one lr >= 0 or one per percent ({n}), got {v}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("eval.finetune.epochs and eval.finetune.batch_size must be >= 1")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"eval.finetune.layer_decay must be in (0, 1] (got {self.layer_decay}); 1 = off")
        if not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0:
            raise ValueError("eval.finetune.momentum must be in [0, 1) and eval.finetune.weight_decay >= 0")


@dataclass
class EvalConfig:
    """Downstream evaluation protocol."""

    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    """Neighbour counts for the weighted kNN classifier."""
    knn_temperature: float = 0.07
    """Temperature of the exp(sim / T) neighbour weights."""
    knn_chunk_size: int = 512
    """Queries scored at once; with knn_train_block it bounds the kNN's working memory per rank."""
    knn_train_block: int = 32768
    """Train rows per similarity tile (a chunk × block tile of fp32 scores and int64 keys is live at a time)."""
    knn_gather_max_mb: float = 64.0
    """Below this size of all train features (fp16 bytes), every rank gathers them and scores its own queries
    (one all-gather); above, train features stay sharded and the top-k candidates are merged across ranks."""
    linear_epochs: int = 100
    """Epochs of linear-probe training on frozen features."""
    linear_lr: float = 0.02
    """Linear-probe base learning rate (SGD, momentum 0.9, cosine), at batch 256; scaled by batch / 256."""
    linear_momentum: float = 0.9
    """SGD momentum of the linear probe."""
    linear_weight_decay: float = 1e-6
    """Linear-probe weight decay."""
    linear_batch_size: int = 256
    """Linear-probe global batch size."""
    linear_normalize: bool = False
    """Put a BatchNorm without affine in front of the linear head (global batch statistics over all ranks;
    standardises features; off = the papers' head)."""
    linear_min_scale: float = 0.0
    """RandomResizedCrop lower scale of the linear and fine-tuning training crops; 0 = 0.08 (torchvision's,
    Barlow Twins') at >= 64 px, 0.2 below. VICReg uses 0.2."""
    feature_batch_size: int = 256
    """Global batch size for feature extraction (kNN, cached linear probe)."""
    feature_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Storage dtype of extracted features on the device and in the cache (fp16 keeps 11 significant bits;
    bf16 for backbones whose features exceed fp16's range; fp32 doubles the memory)."""
    cache_features: bool = False
    """Extract frozen features once and train the head on the cache (fast lr sweeps; no augmentation)."""
    linear_lr_sweep: list[float] = field(default_factory=list)
    """With cache_features: also try these lrs (at batch 256) on the cache; the best val top-1 is reported with every run."""
    online_probe: bool = True
    """Train a linear classifier on detached features during pretraining and report its accuracy."""
    online_probe_lr: float = 0.1
    """Learning rate of the online probe's own SGD optimizer."""
    seed: int = 0
    """Seed of the linear head's initialisation and of the cached-feature shuffling."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The ``finetune`` stage (semi-supervised 1% / 10%)."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if not self.knn_k or any(k < 1 for k in self.knn_k):
            raise ValueError(f"eval.knn_k must be a non-empty list of positive ints (got {self.knn_k})")
        if self.knn_temperature <= 0:
            raise ValueError("eval.knn_temperature must be > 0")
        if self.knn_chunk_size < 1 or self.knn_train_block < 1:
            raise ValueError("eval.knn_chunk_size and eval.knn_train_block must be >= 1")
        if self.knn_gather_max_mb < 0:
            raise ValueError(f"eval.knn_gather_max_mb must be >= 0 (got {self.knn_gather_max_mb})")
        if self.linear_epochs < 1:
            raise ValueError(f"eval.linear_epochs must be >= 1 (got {self.linear_epochs})")
        if self.linear_lr <= 0 or self.online_probe_lr <= 0:
            raise ValueError("eval.linear_lr and eval.online_probe_lr must be > 0")
        if self.linear_batch_size < 1 or self.feature_batch_size < 1:
            raise ValueError("eval.linear_batch_size and eval.feature_batch_size must be >= 1")
        if any(lr <= 0 for lr in self.linear_lr_sweep):
            raise ValueError(f"eval.linear_lr_sweep must hold positive lrs (got {self.linear_lr_sweep})")
        if self.linear_lr_sweep and not self.cache_features:
            raise ValueError("eval.linear_lr_sweep needs eval.cache_features=true (a sweep reuses cached features)")
        if not 0.0 <= self.linear_momentum < 1.0:
            raise ValueError(f"eval.linear_momentum must be in [0, 1) (got {self.linear_momentum})")
        if not 0.0 <= self.linear_min_scale < 1.0:
            raise ValueError(f"eval.linear_min_scale must be in [0, 1) (got {self.linear_min_scale})")
        self.finetune.validate()
