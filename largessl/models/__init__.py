"""Encoder backbones."""

from largessl.models.backbones import BACKBONES, build_backbone
from largessl.models.config import ModelConfig
from largessl.models.timm_backbone import prefers_channels_last

__all__ = ["BACKBONES", "ModelConfig", "build_backbone", "prefers_channels_last"]
