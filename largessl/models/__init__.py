"""Encoder backbones."""

from largessl.models.backbones import BACKBONES, build_backbone
from largessl.models.config import ModelConfig

__all__ = ["BACKBONES", "ModelConfig", "build_backbone"]
