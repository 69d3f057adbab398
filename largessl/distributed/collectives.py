"""Autograd-correct collectives. Every collective of the project lives here.

Each function takes an explicit process ``group`` (``None`` = the default group), is the identity when
torch.distributed is not initialised or the group has one member, and keeps the autograd graph.

Gradient convention: every rank computes the *same* global loss from the reduced/gathered values.
The backward of ``all_reduce_sum`` all-reduces (sums) the incoming gradients, and the backward of
``all_gather_with_grad`` reduce-scatters (sums) them, so each rank's local gradient is W × the
true one; DDP's gradient averaging (÷ W) then yields exactly the gradient of the global loss.
Never use ``ReduceOp.AVG``: gloo does not implement it correctly; SUM and divide by the real count.

Devices: every tensor handed to a collective must live on the training device. The default group of a
CUDA run is ``cpu:gloo,cuda:nccl``, but NCCL itself has no CPU backend, and a group made for one device
(``cuda:nccl``, or ``cuda:gloo`` in the GPU test tier) fails on the first CPU tensor. Object collectives
(:func:`broadcast_object`) are the one intended exception: torch moves them to the group's device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and ``group`` has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Members of ``group``; 1 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def get_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too (each rank holds W× its share)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, differentiable (backward sums gradients across ranks)."""
    if not is_distributed(group):
        return x
    return _AllReduceSum.apply(x, group)


def backend_for(device: torch.device, group: ProcessGroup | None = None) -> str:
    """Name of the backend (``nccl``, ``gloo``, ...) that serves tensors on ``device`` in ``group``.

    Raises ``RuntimeError`` when the group has no backend for that device type (a CPU tensor on an
    NCCL-only group): the message names the device so the offending call site is easy to find.
    """
    config = dist.get_backend_config(group)  # e.g. "cpu:gloo,cuda:nccl"; a plain name serves every device
    pairs = dict(p.split(":", 1) for p in config.split(",") if ":" in p)
    if not pairs:
        return config
    if device.type not in pairs:
        raise RuntimeError(f"the process group ({config}) has no backend for {device.type} tensors; "
                           "move the tensor to the training device before the collective")
    return pairs[device.type]


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each rank's slice of the incoming gradients.

    torch's own ``distributed.nn.all_gather`` picks reduce-scatter only when the whole group is NCCL and
    falls back to all-to-all otherwise, which the ``cpu:gloo,cuda:nccl`` group and gloo's CUDA path do
    not both provide. Here the backward asks which backend serves the gradient's device: NCCL gets one
    reduce-scatter; any other backend gets an all-reduce of the full gradient and keeps its own slice
    (W× the traffic, but gloo is the CPU/test path).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        x = x.contiguous()
        world = dist.get_world_size(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        group, rows = ctx.group, ctx.rows
        grad = grad.contiguous()
        rank = dist.get_rank(group)
        if backend_for(grad.device, group) == "nccl":
            out = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[rank * rows:(rank + 1) * rows].contiguous(), None


def all_gather_with_grad(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 in rank order, differentiable."""
    if not is_distributed(group):
        return x
    return _AllGather.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` along dim 0 in rank order, outside autograd (metrics, evaluation features)."""
    if not is_distributed(group):
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def choose_gram_collective(n_global: int, gathered_cols: int, product_size: int) -> str:
    """``all_gather`` when gathering N rows of ``gathered_cols`` floats moves less than the product, else ``all_reduce``."""
    return "all_gather" if n_global * gathered_cols < product_size else "all_reduce"


def global_gram(a: torch.Tensor, b: torch.Tensor | None = None, group: ProcessGroup | None = None,
                collective: str = "auto") -> torch.Tensor:
    """Σ over every rank's rows of aᵀb (Da×Db; b defaults to a), exact and differentiable either way.

    ``all_gather`` moves the rows (N·(Da+Db) floats) and multiplies the gathered matrices on every rank;
    ``all_reduce`` multiplies locally and sums the Da×Db products. ``auto`` picks whichever moves less.
    """
    if collective not in ("auto", "all_gather", "all_reduce"):
        raise ValueError(f"collective must be auto, all_gather or all_reduce (got {collective!r})")
    same = b is None or b is a
    b = a if b is None else b
    if not is_distributed(group):
        return a.T @ b
    if collective == "auto":
        cols = a.shape[1] if same else a.shape[1] + b.shape[1]
        collective = choose_gram_collective(a.shape[0] * get_world_size(group), cols, a.shape[1] * b.shape[1])
    if collective == "all_gather":
        ga = all_gather_with_grad(a, group)
        gb = ga if same else all_gather_with_grad(b, group)
        return ga.T @ gb
    return all_reduce_sum(a.T @ b, group)


def all_reduce_sum_no_grad(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """In-place sum of ``x`` across ranks outside autograd (counters, running statistics); returns ``x``."""
    if is_distributed(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def device_values(values: list[float], device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A 1-D tensor of host numbers on ``device``, ready for a collective (counters, flags).

    One small host-to-device copy: use it on log steps and stop checks, not per sample. float64 keeps
    integer counters exact far beyond fp32's 2**24; NCCL and gloo both reduce it.
    """
    return torch.tensor(values, dtype=dtype, device=device)


def global_count(n_local: int, device: torch.device, group: ProcessGroup | None = None) -> int:
    """Total number of samples across ranks (a sync point; per-rank batches are equal by construction)."""
    if not is_distributed(group):
        return n_local
    t = torch.tensor([n_local], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t.item())


def broadcast_object(obj: object, src: int = 0, group: ProcessGroup | None = None) -> object:
    """Broadcast a picklable object from ``src`` (e.g. a resume decision made on rank 0)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: ProcessGroup | None = None) -> None:
    """Barrier over ``group`` (no-op for one process)."""
    if is_distributed(group):
        dist.barrier(group=group)


# ---------------------------------------------------------------------------------------------------
# Variable-size and rooted collectives (evaluation: per-rank feature shards of different lengths)


def all_gather_counts(n: int, device: torch.device | str, group: ProcessGroup | None = None) -> list[int]:
    """Every rank's ``n`` in rank order: one all-gather of a one-element tensor on ``device`` (a host sync)."""
    if not is_distributed(group):
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    return [int(v) for v in all_gather_no_grad(t, group).tolist()]


def all_gather_variable(x: torch.Tensor, group: ProcessGroup | None = None,
                        counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` along dim 0 in rank order when ranks hold different numbers of rows (no grad).

    ``counts`` (every rank's row count, e.g. from :func:`all_gather_counts`) saves one collective. Rows
    are padded to the largest count for the fixed-size all-gather and trimmed after, so the traffic is
    W × max(counts) rows.
    """
    if not is_distributed(group):
        return x
    if counts is None:
        counts = all_gather_counts(x.shape[0], x.device, group)
    if len(counts) != dist.get_world_size(group) or counts[dist.get_rank(group)] != x.shape[0]:
        raise AssertionError(f"counts {counts} do not describe this group's {x.shape[0]}-row tensor")
    biggest = max(counts)
    padded = x.detach().new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = all_gather_no_grad(padded, group).split(biggest)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast_tensor(x: torch.Tensor, src: int, group: ProcessGroup | None = None) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s ``x`` (in place, no grad); returns ``x``.

    Every rank passes a tensor of the same shape and dtype on its training device; ``src`` is the rank
    within ``group``.
    """
    if is_distributed(group):
        root = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(x, src=root, group=group)
    return x
