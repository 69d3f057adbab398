"""Projector / predictor heads shared by the methods."""

from __future__ import annotations

import torch
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
        group: ProcessGroup | None = None, last_bn: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU for every hidden layer, then a plain Linear (the Barlow Twins / VICReg projector).

    Hidden BNs use :class:`GlobalBatchNorm1d` so their statistics are over the global batch.
    ``last_bn`` appends a BN without affine after the last Linear (the SimSiam projector).
    """
    layers: list[nn.Module] = []
    prev = in_dim
    for d in dims[:-1]:
        layers.append(nn.Linear(prev, d, bias=not hidden_bn))
        if hidden_bn:
            layers.append(GlobalBatchNorm1d(d, group=group))
        layers.append(nn.ReLU(inplace=True))
        prev = d
    layers.append(nn.Linear(prev, dims[-1], bias=last_bias and not last_bn))
    if last_bn:
        layers.append(GlobalBatchNorm1d(dims[-1], affine=False, group=group))
    return nn.Sequential(*layers)


class Bias(nn.Module):
    """p = z + b: the single-bias predictor of seed 004 §4 (b learns the centre vector)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Add the learned bias."""
        return z + self.bias


class TanhLinear(nn.Module):
    """A single FC layer whose weight is tanh(V): seed 004's Tanh-constrained FC predictor.

    The paper squashes the weights with tanh after every iteration; parametrising W = tanh(V) keeps the
    same bounded weights without an optimizer hook (a method knows nothing of the optimizer).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """tanh(V) z + b."""
        return nn.functional.linear(z, torch.tanh(self.linear.weight), self.linear.bias)


PREDICTORS = ("mlp", "fc_fc_bias", "tanh_fc", "bias")


@HEADS.register("predictor")
def predictor(variant: str, dim: int, hidden: int, group: ProcessGroup | None = None) -> nn.Module:
    """SimSiam predictor variants (seed 004 §4, Table 5): mlp, fc_fc_bias, tanh_fc, bias."""
    if variant == "mlp":  # Linear-BN-ReLU-Linear(bias), the SimSiam bottleneck
        return mlp(dim, [hidden, dim], last_bias=True, group=group)
    if variant == "fc_fc_bias":  # the MLP without BN and ReLU: two FCs, then a bias
        return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=True))
    if variant == "tanh_fc":
        return TanhLinear(dim)
    if variant == "bias":
        return Bias(dim)
    raise ValueError(f"unknown predictor {variant!r}; valid predictors: {', '.join(PREDICTORS)}")
