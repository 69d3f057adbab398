"""Evaluation configuration (linear probe, kNN, online probe)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """Downstream evaluation protocol."""

    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    """Neighbour counts for the weighted kNN classifier."""
    knn_temperature: float = 0.07
    """Temperature of the exp(sim / T) neighbour weights."""
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
    """Put a BatchNorm without affine in front of the linear head (standardises features; off = the papers' head)."""
    feature_batch_size: int = 256
    """Global batch size for feature extraction (kNN, cached linear probe)."""
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

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if not self.knn_k or any(k < 1 for k in self.knn_k):
            raise ValueError(f"eval.knn_k must be a non-empty list of positive ints (got {self.knn_k})")
        if self.knn_temperature <= 0:
            raise ValueError("eval.knn_temperature must be > 0")
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
