"""Batch normalisation over the global batch of all ranks, autograd-correct, on CPU and GPU.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and a per-rank BN silently changes the method when the
world size changes; this layer gives the same output and gradients on W ranks × B as on 1 rank × W·B.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.dist.collectives import all_reduce_sum, get_world_size


def global_mean_var(x: torch.Tensor, group: ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-feature mean and biased variance of ``x`` (N_local, D) over all ranks, and the global N.

    Two passes (mean, then centred squares) for accuracy; the count travels with the sums so the
    normalisation uses the real gathered N. Gradients flow through both all-reduces.
    """
    # new_full launches a fill kernel; torch.tensor(..., device=cuda) would copy from pageable memory and sync.
    n_local = x.new_full((1,), float(x.shape[0]))
    packed = all_reduce_sum(torch.cat([x.sum(0), n_local]), group)
    n = packed[-1]
    mean = packed[:-1] / n
    var = all_reduce_sum((x - mean).pow(2).sum(0), group) / n
    return mean, var, n


class GlobalBatchNorm1d(nn.Module):
    """BatchNorm1d whose statistics are over the global batch across ranks.

    Args:
        num_features: feature dimension D.
        eps: added to the variance; seed 000 (Table 2) needs ``eps=0`` at the projector output.
        affine: learnable scale and shift; seed 000 shows affine at the output degrades SSL.
        momentum: running-statistics momentum (for eval mode).
        group: process group of the statistics (``None`` = default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, momentum: float = 0.1,
                 group: ProcessGroup | None = None) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0 (got {eps})")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.momentum = momentum
        self.group = group
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (N, D) with global batch statistics in training, running statistics in eval."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm1d({self.num_features}) expects (N, {self.num_features}), got {tuple(x.shape)}")
        # Batch statistics in fp32 even under autocast: a bf16 variance is too coarse; the output stays fp32.
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if self.training:
            if x.shape[0] * get_world_size(self.group) < 2:
                raise ValueError("GlobalBatchNorm1d needs a global batch of at least 2 samples in training")
            mean, var, n = global_mean_var(x, self.group)
            with torch.no_grad():  # n stays a tensor: no host-device sync on the hot path
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, momentum={self.momentum}"
