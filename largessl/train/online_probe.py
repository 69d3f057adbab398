"""Online linear probe: a classifier trained on detached backbone features during pretraining.

It owns its optimizer and never sends gradients into the backbone, so it does not change pretraining;
its accuracy is a cheap running signal of representation quality (and of collapse). Keep its parameters
out of the pretraining optimizer and out of DDP: it synchronises its own (tiny) gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum_no_grad, get_world_size


class OnlineProbe(nn.Module):
    """Linear classifier on detached features with its own SGD optimizer."""

    def __init__(self, num_features: int, num_classes: int, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if num_features < 1 or num_classes < 2:
            raise ValueError(f"online probe needs num_features >= 1 and num_classes >= 2 "
                             f"(got {num_features}, {num_classes})")
        self.head = nn.Linear(num_features, num_classes)
        self.num_classes = num_classes
        self.group = group
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits for ``features`` (detached: no gradient reaches the backbone)."""
        return self.head(features.detach().float())

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step on this rank's batch; returns detached ``online_probe_loss`` and ``online_probe_top1`` (%).

        Samples with label -1 (unknown) are ignored. With several ranks the gradients are summed and divided
        by the world size (one small all-reduce per step) so every rank keeps the same head.
        """
        device_type = features.device.type
        # the trainer may call this inside autocast; the probe is tiny, keep it fp32
        with torch.autocast(device_type=device_type, enabled=False):
            labels = labels.to(features.device).long()
            valid = (labels >= 0).float()
            logits = self(features)
            # Masked arithmetic instead of `if valid.any()` and boolean indexing: both would make the host wait
            # for the GPU every step. Unknown labels (-1) weigh 0; with none valid the loss is 0 (zero gradient,
            # the collective below still runs in step with the other ranks) and top-1 is 0.
            count = valid.sum().clamp_min(1.0)
            per_sample = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
            loss = (per_sample * valid).sum() / count
            top1 = ((logits.argmax(1) == labels).float() * valid).sum() / count * 100.0
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            world = get_world_size(self.group)
            if world > 1:
                for p in self.head.parameters():
                    all_reduce_sum_no_grad(p.grad, self.group).div_(world)
            self.optimizer.step()
        return {"online_probe_loss": loss.detach(), "online_probe_top1": top1.detach()}

    def full_state_dict(self) -> dict[str, Any]:
        """Head weights and optimizer state (momentum buffers), for the training checkpoint."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`full_state_dict` returned (strict)."""
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
