"""largessl.hub: publish, verify, load and export pretrained backbones (``load_backbone`` is the downstream API).

The names below load their module on first use, so importing a part of the hub (its config section, say)
does not import the rest of it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_backbone": "largessl.hub.api",
    "FORMATS": "largessl.hub.formats",
    "export_model": "largessl.hub.formats",
    "Hub": "largessl.hub.store",
    "IntegrityError": "largessl.hub.store",
    "ModelRef": "largessl.hub.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'largessl.hub' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
