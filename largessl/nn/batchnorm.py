"""Batch normalisation over the global batch of all ranks, autograd-correct, on CPU and GPU.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and a per-rank BN silently changes the method when the
world size changes; these layers give the same output and gradients on W ranks × B as on 1 rank × W·B:
:class:`GlobalBatchNorm1d` for projector heads and :class:`GlobalBatchNorm` (any ``(N, C, ...)``) for
the backbone's BatchNorm2d layers (``model.sync_bn=true``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum, get_world_size


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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics span the global batch of ``group``.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` with the same parameters, buffers and state_dict keys and the
    same running-statistics semantics (momentum or cumulative average, unbiased running variance over the
    global count). Per device:

    - CUDA: the kernels of ``torch.nn.SyncBatchNorm`` (one all-gather of every rank's mean, invstd and
      count, fused backward). It is not a subclass of ``nn.SyncBatchNorm`` on purpose: DDP refuses to wrap
      any module holding one on CPU, and this layer must also run there.
    - CPU (where torch's SyncBatchNorm refuses to run): two autograd-correct all-reduces (sums and count,
      then centred squares) through :func:`largessl.distributed.collectives.all_reduce_sum`. Statistics are fp32
      whatever the autocast dtype; the output has the input's dtype, as cuDNN's BN does.
    - One rank, or eval mode: plain ``F.batch_norm``, exactly ``nn.BatchNorm2d``.

    Gradients follow the project's convention (every rank computes the same global loss; the collectives'
    backward sums over ranks and DDP averages), which torch's SyncBatchNorm backward also satisfies
    because it is linear in the incoming gradient.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm({self.num_features}) expects (N, {self.num_features}, ...) inputs, "
                             f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with global batch statistics in training (world > 1), else as ``nn.BatchNorm``."""
        world = get_world_size(self.group)
        if not (self.training and world > 1):
            return super().forward(x)
        self._check_input_dim(x)
        factor: float | torch.Tensor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked.item())
        if x.is_cuda:
            return self._cuda_forward(x, factor, world)
        return self._cpu_forward(x, factor)

    def _cuda_forward(self, x: torch.Tensor, factor: float, world: int) -> torch.Tensor:
        # torch.nn.SyncBatchNorm's own autograd function (what its forward calls), with our group.
        from torch.nn.modules._functions import SyncBatchNorm as _SyncBNFunction

        return _SyncBNFunction.apply(
            x, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None, self.eps, factor,
            self.group or torch.distributed.group.WORLD, world)

    def _cpu_forward(self, x: torch.Tensor, factor: float) -> torch.Tensor:
        c = self.num_features
        dims = [0, *range(2, x.dim())]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n_local = xf.new_full((1,), float(x.numel() // c))
        packed = all_reduce_sum(torch.cat([xf.sum(dims), n_local]), self.group)
        n = packed[c]
        mean = packed[:c] / n
        var = all_reduce_sum((xf - mean.view(shape)).pow(2).sum(dims), self.group) / n
        if self.track_running_stats:
            with torch.no_grad():  # n stays a tensor: no host sync for the unbiased correction
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_bn(module: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` under ``module`` by a :class:`GlobalBatchNorm` (weights kept).

    The state_dict keys and values are unchanged, so checkpoints load either way.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, group)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_to_global_bn(child, group)
        if new is not child:
            setattr(module, name, new)
    return module
