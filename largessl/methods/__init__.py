"""SSL methods: one module per method, each registered in ``METHODS`` with its config dataclass."""

from __future__ import annotations

from torch import nn
from torch.distributed import ProcessGroup

from largessl.methods import barlow_twins, decorrelation, multiview, simsiam, vicreg  # noqa: F401  (registers)
from largessl.methods.base import METHODS, MethodConfig, MethodOutput, check_output

__all__ = ["METHODS", "MethodConfig", "MethodOutput", "build_method", "check_output"]


def build_method(cfg: MethodConfig, backbone: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Instantiate the registered method ``cfg.name`` around ``backbone``."""
    cls = METHODS.get(cfg.name)
    expected = METHODS.extra(cfg.name, "config")
    if not isinstance(cfg, expected):
        raise ValueError(f"method {cfg.name!r} needs a {expected.__name__}, got a {type(cfg).__name__}; "
                         "build the config with largessl.config.load_config")
    return cls(cfg, backbone, group)
