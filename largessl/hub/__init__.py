"""largessl.hub: publish, verify, load and export pretrained backbones (``load_backbone`` is the downstream API)."""

from largessl.hub.api import load_backbone
from largessl.hub.formats import FORMATS, export_model
from largessl.hub.store import Hub, IntegrityError, ModelRef

__all__ = ["FORMATS", "Hub", "IntegrityError", "ModelRef", "export_model", "load_backbone"]
