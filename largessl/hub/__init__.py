"""largessl.hub: publish, verify and load pretrained backbones (``load_backbone`` is the downstream API)."""

from largessl.hub.api import load_backbone
from largessl.hub.store import Hub, IntegrityError, ModelRef

__all__ = ["Hub", "IntegrityError", "ModelRef", "load_backbone"]
