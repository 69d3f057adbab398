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
    """Linear-probe base learning rate (SGD, momentum 0.9, cosine), at batch 256."""
    linear_weight_decay: float = 1e-6
    """Linear-probe weight decay."""
    linear_batch_size: int = 256
    """Linear-probe global batch size."""
    cache_features: bool = False
    """Extract frozen features once and train the head on the cache (fast lr sweeps; no augmentation)."""
    online_probe: bool = True
    """Train a linear classifier on detached features during pretraining and report its accuracy."""
    online_probe_lr: float = 0.1
    """Learning rate of the online probe's own SGD optimizer."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if not self.knn_k or any(k < 1 for k in self.knn_k):
            raise ValueError(f"eval.knn_k must be a non-empty list of positive ints (got {self.knn_k})")
        if self.knn_temperature <= 0:
            raise ValueError("eval.knn_temperature must be > 0")
