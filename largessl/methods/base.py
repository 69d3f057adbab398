"""What every SSL method provides: a config dataclass, a module returning :class:`MethodOutput`, a registry.

A method's module subclasses :class:`SSLMethod`, which owns the shared skeleton (validate the config, keep
the backbone, build the projector, encode every view, pack the output); the method file itself holds the
paper's loss, its config and, where the paper says so, its own heads (:meth:`SSLMethod.build_heads`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.methods.heads import mlp, parse_dims
from largessl.nn.host_sync import host_side
from largessl.registry import Registry

METHODS: Registry[type[nn.Module]] = Registry("method")
"""Method modules by name; each is registered with ``config=<its config dataclass>``."""


@dataclass
class MethodConfig:
    """Fields shared by every method's config; each method subclasses this with its own fields."""

    name: str = "barlow_twins"
    """Method name from the method registry."""

    def check_plan(self, global_batch_size: int, per_rank_batch_size: int) -> None:
        """Raise ``ValueError`` when the method cannot run with these batch sizes (e.g. DBN's rank bound)."""


@dataclass
class MethodOutput:
    """What a method's forward returns to the training step."""

    loss: torch.Tensor
    """Scalar loss to back-propagate (fp32)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached scalar loss terms (e.g. invariance, redundancy); read with ``.item()`` only on log steps."""
    embeddings: list[torch.Tensor] = field(default_factory=list)
    """Detached per-view projector outputs (local batch), for collapse metrics."""
    features: torch.Tensor | None = None
    """Detached backbone features of the first view (local batch), for the online probe."""


def check_finite(name: str, value: torch.Tensor, step: int | None) -> None:
    """Raise ``FloatingPointError`` naming the step and the term when ``value`` holds NaN or Inf.

    This is a host-device sync: call it only where the caller already syncs (log steps) or on CPU.
    """
    if not torch.isfinite(value).all():
        where = f" at step {step}" if step is not None else ""
        raise FloatingPointError(
            f"non-finite values in {name}{where}; lower the learning rate, check the data, or use fp32"
        )


def check_loss(method: str, total: torch.Tensor, terms: dict[str, torch.Tensor], step: int | None,
               embeddings: Sequence[torch.Tensor] = ()) -> None:
    """Raise ``FloatingPointError`` naming the step, the non-finite loss terms and views when ``total`` is not finite.

    One host-device sync: methods call it on CPU tensors only; on GPU the trainer calls it on log steps.
    """
    if torch.isfinite(total).all():
        return
    bad_terms = [k for k, v in terms.items() if not torch.isfinite(v).all()] or ["loss"]
    bad_views = [i for i, z in enumerate(embeddings) if not torch.isfinite(z).all()]
    where = f" at step {step}" if step is not None else ""
    views = f"; the embeddings of view(s) {bad_views} hold NaN/Inf" if bad_views else ""
    raise FloatingPointError(
        f"{method}: non-finite loss term(s) {', '.join(bad_terms)}{where}{views}; "
        "lower the learning rate, check the input data, or train in fp32"
    )


def check_output(method: str, out: MethodOutput, step: int | None) -> None:
    """:func:`check_loss` on a :class:`MethodOutput` (for the trainer on log steps)."""
    check_loss(method, out.loss.detach(), out.metrics, step, out.embeddings)


def check_pair(z_a: torch.Tensor, z_b: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``z_a`` and ``z_b`` are (N, D) embeddings of the same shape."""
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"{what} needs two (N, D) embeddings of equal shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}; "
            "both views must go through the same projector"
        )


def check_weights(weights: dict[str, float | None]) -> None:
    """Raise ``ValueError`` when a loss-term weight is negative or every weight is 0 (nothing would train).

    ``weights`` maps each term's config key (``method.<key>``) to its weight; None means "derived" and counts
    as positive.
    """
    for key, w in weights.items():
        if w is not None and w < 0:
            raise ValueError(f"method.{key} must be >= 0 (got {w}); 0 removes its term from the loss")
    if all(w is not None and w == 0 for w in weights.values()):
        keys = ", ".join(f"method.{k}" for k in weights)
        raise ValueError(f"every loss-term weight is 0 ({keys}); set at least one to a positive value")


def as_loss_dtype(z: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → fp32 (losses sum over the global batch); fp32 and fp64 pass through."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


@contextmanager
def full_precision(like: torch.Tensor) -> Iterator[None]:
    """Disable autocast so the products inside a loss (covariances, C) run in the inputs' precision."""
    with torch.autocast(device_type=like.device.type, enabled=False):
        yield


def backbone_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``backbone(x)`` checked to be (N, backbone.num_features), so a wrong head width fails with a clear message."""
    f = backbone(x)
    expected = getattr(backbone, "num_features", None)
    if f.dim() != 2 or (expected is not None and f.shape[1] != expected):
        raise ValueError(
            f"the backbone returned features of shape {tuple(f.shape)} but declares num_features={expected}; "
            "the projector's input width comes from num_features, so fix the backbone's num_features"
        )
    return f


def backbone_width(backbone: nn.Module) -> int:
    """``backbone.num_features``, or a ``ValueError`` saying the backbone must declare it."""
    width = getattr(backbone, "num_features", None)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"the backbone {type(backbone).__name__} must have an int attribute num_features "
                         "(the width of its pooled features) to size the projector")
    return width


def require_views(method: str, views: Sequence[torch.Tensor], expected: int) -> None:
    """Raise ``ValueError`` unless the data pipeline made ``expected`` views."""
    if len(views) != expected:
        raise ValueError(f"{method} expects {expected} views, got {len(views)}; set data.num_views={expected}")


def encode_views(backbone: nn.Module, projector: nn.Module,
                 views: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Backbone features and projector outputs of every view (the same modules for all views)."""
    feats = [backbone_features(backbone, v) for v in views]
    return feats, [projector(f) for f in feats]


def method_output(method: str, total: torch.Tensor, terms: dict[str, torch.Tensor], step: int | None,
                  z: Sequence[torch.Tensor], first_features: torch.Tensor) -> MethodOutput:
    """Pack a :class:`MethodOutput`; on CPU check the loss is finite here (on GPU the trainer does, on log steps)."""
    if not total.is_cuda:
        with host_side():  # free on the CPU, where nothing is queued; a GPU run never comes here
            check_loss(method, total, terms, step, z)
    return MethodOutput(loss=total, metrics=terms, embeddings=[t.detach() for t in z],
                        features=first_features.detach())


class SSLMethod(nn.Module):
    """Backbone → projector → the method's loss on the views of one batch.

    Subclasses implement :meth:`objective` (the paper's loss of the projector outputs) and override
    :meth:`build_heads` or :meth:`check_views` where the paper differs from one projector on two views.
    ``cfg.name`` names the method in errors and checks.
    """

    def __init__(self, cfg: Any, backbone: nn.Module, group: ProcessGroup | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.group = group
        self.backbone = backbone
        self.build_heads(backbone_width(backbone))

    def build_heads(self, width: int) -> None:
        """The heads on ``width`` backbone features: by default the MLP projector ``cfg.projector``."""
        self.projector = mlp(width, parse_dims(self.cfg.projector), group=self.group)

    def check_views(self, views: Sequence[torch.Tensor]) -> None:
        """Raise ``ValueError`` unless the batch has the views the method needs (two by default)."""
        require_views(self.cfg.name, views, 2)

    def objective(self, z: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached loss terms) of the projector outputs of every view."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], step: int | None = None) -> MethodOutput:
        """Loss of the views of one batch."""
        self.check_views(views)
        feats, z = encode_views(self.backbone, self.projector, views)
        total, terms = self.objective(z)
        return method_output(self.cfg.name, total, terms, step, z, feats[0])
