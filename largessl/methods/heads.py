"""Projector / predictor heads shared by the methods."""

from __future__ import annotations

from torch import nn
from torch.distributed import ProcessGroup

from largessl.nn.batchnorm import GlobalBatchNorm1d
from largessl.registry import Registry

HEADS: Registry = Registry("head")


def parse_dims(spec: str | list[int], what: str = "method.projector") -> list[int]:
    """``"8192-8192-8192"`` or ``[8192, 8192, 8192]`` → list of positive ints; anything else raises."""
    if isinstance(spec, str):
        try:
            dims = [int(p) for p in spec.split("-") if p.strip()]
        except ValueError:
            raise ValueError(f"{what}={spec!r} must be dash-separated layer widths, e.g. 8192-8192-8192") from None
    else:
        dims = list(spec)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"{what}={spec!r} must list at least one positive layer width")
    return dims


@HEADS.register("mlp")
def mlp(in_dim: int, dims: list[int], hidden_bn: bool = True, last_bias: bool = False,
        group: ProcessGroup | None = None) -> nn.Sequential:
    """Linear-BN-ReLU for every hidden layer, then a plain Linear (the Barlow Twins / VICReg projector).

    Hidden BNs use :class:`GlobalBatchNorm1d` so their statistics are over the global batch.
    """
    layers: list[nn.Module] = []
    prev = in_dim
    for d in dims[:-1]:
        layers.append(nn.Linear(prev, d, bias=not hidden_bn))
        if hidden_bn:
            layers.append(GlobalBatchNorm1d(d, group=group))
        layers.append(nn.ReLU(inplace=True))
        prev = d
    layers.append(nn.Linear(prev, dims[-1], bias=last_bias))
    return nn.Sequential(*layers)
