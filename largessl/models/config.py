"""Backbone configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which encoder backbone to build."""

    arch: str = "resnet50"
    """Backbone name from the backbone registry (resnet18, resnet34, resnet50, resnet101, resnet152), or
    ``timm/<name>`` for any timm model (``timm/vit_small_patch16_224``, ``timm/convnext_tiny``), built with
    ``pretrained=False, num_classes=0`` (pooled features; nothing is downloaded)."""
    small_input: bool = False
    """CIFAR-style stem for 32/64-px images: 3x3 stride-1 first conv and no max-pool."""
    sync_bn: bool = False
    """Compute every backbone BatchNorm's statistics over the global batch of all ranks, autograd-correct
    (torch SyncBatchNorm kernels on CUDA, largessl's all-reduce BN on CPU). The papers' reference code
    does this; per-rank BN changes the method with the world size. Same state_dict either way."""
    zero_init_residual: bool = True
    """Zero-init the last BN gamma of each residual block (as the Barlow Twins/VICReg references do); torchvision
    ResNets only (timm models keep their own init)."""
    image_size: int = 0
    """Input size given to timm models that take one (``img_size``: a ViT's patch grid and position embedding);
    0 = data.image_size, filled in when the config is resolved. Unused by ResNets."""
    drop_path_rate: float = 0.0
    """Stochastic depth of timm models (``drop_path_rate``); 0 = off. ResNets: must stay 0."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (e.g. ``{depth: 4, embed_dim: 96, num_heads: 3, patch_size: 8}`` for a
    tiny CPU ViT); saved with the run so the hub and exports rebuild the same model."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        timm = self.arch.startswith("timm/")
        if not timm and (self.drop_path_rate or self.timm_kwargs):
            raise ValueError(f"model.drop_path_rate and model.timm_kwargs apply to timm models (model.arch=timm/...); "
                             f"{self.arch} takes neither")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1) (got {self.drop_path_rate})")
        if self.image_size < 0:
            raise ValueError(f"model.image_size must be >= 0 (got {self.image_size})")
        reserved = {"pretrained", "num_classes", "img_size", "drop_path_rate"} & set(self.timm_kwargs)
        if reserved:
            raise ValueError(f"model.timm_kwargs may not set {sorted(reserved)}: pretrained is always false, "
                             "num_classes 0, and img_size / drop_path_rate come from model.image_size / "
                             "model.drop_path_rate")
