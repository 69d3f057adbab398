"""Backbone configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Which encoder backbone to build."""

    arch: str = "resnet50"
    """Backbone name from the backbone registry (resnet18, resnet34, resnet50, resnet101, resnet152)."""
    small_input: bool = False
    """CIFAR-style stem for 32/64-px images: 3x3 stride-1 first conv and no max-pool."""
    sync_bn: bool = False
    """Convert the backbone's BatchNorm2d to SyncBatchNorm (GPU only; ignored with a warning on CPU)."""
    zero_init_residual: bool = True
    """Zero-init the last BN gamma of each residual block (as the Barlow Twins/VICReg references do)."""
