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
    """Compute every backbone BatchNorm's statistics over the global batch of all ranks, autograd-correct
    (torch SyncBatchNorm kernels on CUDA, largessl's all-reduce BN on CPU). The papers' reference code
    does this; per-rank BN changes the method with the world size. Same state_dict either way."""
    zero_init_residual: bool = True
    """Zero-init the last BN gamma of each residual block (as the Barlow Twins/VICReg references do)."""
