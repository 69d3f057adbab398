"""SSL methods: one module per method, each registered in ``METHODS`` with its config dataclass."""

from largessl.methods import barlow_twins  # noqa: F401  (registers)
from largessl.methods.base import METHODS, MethodConfig, MethodOutput

__all__ = ["METHODS", "MethodConfig", "MethodOutput", "build_method"]


def build_method(cfg: MethodConfig, backbone, group=None):
    """Instantiate the registered method ``cfg.name`` around ``backbone``."""
    return METHODS.get(cfg.name)(cfg, backbone, group)
