"""Count the operations that make the host wait for the GPU, on any device (CPU included).

On CUDA the host queues kernels and runs ahead; an operation whose *result the host needs* ends that: the
host blocks until every queued kernel has run. :class:`HostSyncCounter` is a ``TorchDispatchMode`` that
sees every aten call and counts those, by name, whatever the tensors' device, so CPU tests and
``largessl bench step`` find the syncs a GPU run would pay:

- ``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``;
- ``aten.is_nonzero`` and ``aten.equal`` (a Python bool from tensors);
- ops whose output *size* depends on the data: ``nonzero``/``argwhere``, ``masked_select``, indexing or
  ``index_put`` with a boolean mask, ``unique`` (all variants), ``repeat_interleave`` with a tensor of repeats
  and no ``output_size``;
- linear algebra that checks its solver's status on the host (``linalg.eigh``, ``cholesky``, ``inv``, ``solve``);
- on CUDA only (the devices are visible there): copies from the GPU to the host, and copies from pageable
  (unpinned) host memory to the GPU.

Which tensors count: on a CUDA run, calls with a CUDA tensor (and the copies above). On a CPU run the CPU
stands in for the device, so calls on CPU tensors count, except inside :func:`host_side`: code that
deliberately works on host data (the augmentation parameters drawn by the workers, a batch's labels before
they are copied) says so there, since on a GPU run those tensors stay on the host and cost no sync.
A host-to-device copy of a pageable tensor (``cpu_tensor.to("cuda")``) is invisible on the CPU, where no copy
happens; the CUDA tier (``tests/gpu``) and the acceptance script count it on a device.

:func:`to_device` is the copy that never blocks: pinned host memory and ``non_blocking`` on CUDA.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_HOST = threading.local()


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Mark work on host tensors (never on the device in a GPU run): a CPU run's counter ignores it."""
    depth = getattr(_HOST, "depth", 0)
    _HOST.depth = depth + 1
    try:
        yield
    finally:
        _HOST.depth = depth


def in_host_side() -> bool:
    """Whether the calling thread is inside :func:`host_side`."""
    return getattr(_HOST, "depth", 0) > 0


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: a host tensor goes through pinned memory with
    ``non_blocking`` to CUDA (a pageable copy would wait); on the CPU it is returned as is."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device, non_blocking=True)

_ALWAYS = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "is_nonzero",
    aten.equal.default: "equal",
    aten.nonzero.default: "nonzero",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    # linalg ops without ``_ex`` read their LAPACK/cuSOLVER info on the host to raise on failure: eigh inside
    # its kernel (torch's _linalg_eigh_out calls _linalg_check_errors), the others through this op
    aten._linalg_eigh.default: "linalg_eigh",
    aten._linalg_check_errors.default: "linalg_error_check",
}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


def _has_mask(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _device_of(value: Any) -> torch.device | None:
    if value is None:
        return None
    return torch.device(value)


def sync_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or None when it does not block the host."""
    name = _ALWAYS.get(func)
    if name is not None:
        return name
    if func in _INDEX:
        return "boolean_mask_index" if _has_mask(args[1] if len(args) > 1 else kwargs.get("indices")) else None
    if func in _REPEAT:
        output_size = kwargs.get("output_size")
        if output_size is None and func is aten.repeat_interleave.self_Tensor and len(args) > 3:
            output_size = args[3]
        return "repeat_interleave" if output_size is None else None
    if func is aten._to_copy.default:
        src, target = args[0], _device_of(kwargs.get("device"))
        if isinstance(src, torch.Tensor) and target is not None and target.type != src.device.type:
            return _copy_kind(src, target)
        return None
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and dst.device.type != src.device.type:
            return _copy_kind(src, dst.device)
    return None


def _copy_kind(src: torch.Tensor, target: torch.device) -> str | None:
    if src.device.type == "cuda" and target.type == "cpu":
        return "device_to_host_copy"
    if src.device.type == "cpu" and target.type == "cuda" and not src.is_pinned():
        return "pageable_host_to_device_copy"
    return None


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter(device) as c: ...`` then ``c.total`` / ``c.counts`` (a Counter by kind).

    ``device``: the training device. CUDA: calls that touch a CUDA tensor count (and GPU-to-host or pageable
    host-to-GPU copies). CPU: calls on CPU tensors count outside :func:`host_side` (the CPU plays the device).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter()
        self.enabled = True
        """Set False around code whose syncs are expected (log steps): nothing is counted then."""

    @property
    def total(self) -> int:
        """Host syncs counted so far."""
        return sum(self.counts.values())

    def reset(self) -> Counter[str]:
        """The counts so far; the counter starts again from zero."""
        out, self.counts = self.counts, Counter()
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.enabled:
            kind = sync_kind(func, args, kwargs)
            if kind is not None and self._on_device(kind, args):
                self.counts[kind] += 1
        return func(*args, **kwargs)

    def _on_device(self, kind: str, args: tuple[Any, ...]) -> bool:
        if kind.endswith("_copy"):
            return True  # only produced for copies between the host and a GPU
        if self.device.type == "cpu":
            return not in_host_side()
        return any(t.device.type == self.device.type for t in _tensors(args))
