"""A small CNN backbone so every repro table trains in minutes on two CPU cores.

The seed papers use a CIFAR ResNet-18; on 2 CPU cores one ResNet-18 step at batch 256 takes seconds, which
leaves a few dozen steps per variant in a 10-minute table, too few for collapse to show. The collapse
patterns live in the projector, its normalisation and the loss, not in the backbone's depth, so a
3-conv network with BatchNorm (the same BN-in-the-backbone situation as a ResNet) keeps the claims testable.

Registered in the backbone registry as ``repro_convnet`` (so evaluation, the hub and ``pretrain`` can rebuild
it from a run's config); it follows torchvision's classifier layout (``fc`` head, removed by
:func:`largessl.models.build_backbone`).
"""

from __future__ import annotations

import torch
from torch import nn

ARCH = "repro_convnet"
"""Registry name of :class:`SmallConvNet`."""


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class SmallConvNet(nn.Module):
    """conv(32, /2) → conv(64) → conv(128, /2) → global average pool → ``fc`` (16-px input: 8×8, then 4×4)."""

    def __init__(self, width: int = 32, num_classes: int = 1000) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(*_block(3, w, 2), *_block(w, 2 * w, 1), *_block(2 * w, 4 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features through ``fc`` (the identity once built as a backbone)."""
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_convnet(weights: None = None, zero_init_residual: bool = False, **_: object) -> SmallConvNet:
    """torchvision-style factory (``weights`` must be None: there are no pretrained weights)."""
    if weights is not None:
        raise ValueError(f"{ARCH} has no pretrained weights; build it with weights=None")
    return SmallConvNet()
