"""The unit the data pipeline hands to the training step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One per-rank batch: M augmented views of the same images, their labels and sample keys."""

    views: list[torch.Tensor]
    """M tensors of shape (B, 3, H, W) (float, normalised); multi-crop views may differ in H, W."""
    labels: torch.Tensor
    """(B,) int64 class labels (-1 when unknown); used only by probes and evaluation."""
    keys: list[str] = field(default_factory=list)
    """WebDataset ``__key__`` of each sample (for exact-resume checks and bad-sample logs)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counters accumulated by the worker that made this batch (e.g. skipped_samples, skipped_shards)."""

    def to(self, device: torch.device, non_blocking: bool = True,
           memory_format: torch.memory_format = torch.contiguous_format) -> Batch:
        """Copy views and labels to ``device`` (non-blocking from pinned memory)."""
        return Batch(
            views=[v.to(device, non_blocking=non_blocking, memory_format=memory_format) for v in self.views],
            labels=self.labels.to(device, non_blocking=non_blocking),
            keys=self.keys,
            stats=self.stats,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader calls this when pin_memory=True)."""
        return Batch([v.pin_memory() for v in self.views], self.labels.pin_memory(), self.keys, self.stats)
