"""Feature decorrelation in the concise framework (Hua et al., "On Feature Decorrelation in SSL", ICCV 2021).

Paper → code (seed 000):
- Def. 1 concise framework: encoder f = backbone + projector, loss ℓ(f(x1), f(x2)), no predictor,
  no stop-gradient, no negatives                               → :class:`Decorrelation`
- ℓ = ||z1 − z2||² (default, §3.4.1) or a cosine loss          → ``loss`` (``kind="mse" | "cosine"``);
  the framework's only loss term, weighted by ``inv_weight`` (1; no regulariser: BN/DBN prevent collapse)
- projector head (§3.2–3.3): nothing (vanilla; collapses completely), BN without affine and eps=0
  (Def. 2; collapses dimensionally), DBN (Def. 3–4), Shuffled-DBN (Def. 5)  → ``head``
- projector (§4.1): 3-layer MLP, hidden = 2× input, output = input, BN+ReLU on hidden layers
  → ``projector="auto"``; any dims string (e.g. a 2-D output "64-64-2", §3.2) also works.
- Rank bound (§3.4.3): DBN needs global batch − 1 ≥ G  → ``check_plan`` at start-up, and the layer.

Distributed: BN/DBN statistics are over the global batch (``largessl.nn``), the loss is a sum over
the global batch divided by the real gathered N, and Shuffled-DBN draws its permutation from
(seed, step) so every rank uses the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum
from largessl.methods.base import (
    METHODS,
    MethodConfig,
    MethodOutput,
    SSLMethod,
    as_loss_dtype,
    backbone_features,
    check_pair,
    check_weights,
    full_precision,
    method_output,
    require_views,
)
from largessl.methods.heads import mlp, parse_dims
from largessl.nn.batchnorm import GlobalBatchNorm1d
from largessl.nn.whitening import DBN, ShuffledDBN

HEAD_KINDS = ("none", "bn", "dbn", "shuffled_dbn")


@dataclass
class DecorrelationConfig(MethodConfig):
    """Concise-framework hyper-parameters (seed 000 defaults: Shuffled-DBN, G = batch/2, squared error)."""

    name: str = "decorrelation"
    """Method name."""
    projector: str = "auto"
    """Projector widths; auto = seed 000's 3-layer MLP (2F-2F-F for backbone width F)."""
    head: Literal["none", "bn", "dbn", "shuffled_dbn"] = "shuffled_dbn"
    """Normalisation at the projector output: none (vanilla), bn (Def. 2), dbn (Def. 3), shuffled_dbn (Def. 5)."""
    bn_eps: float = 0.0
    """eps of the bn head; seed 000 Table 2: eps=0.1 drops linear accuracy from 70.85% to 34.47%."""
    bn_affine: bool = False
    """Affine scale/shift in the bn head; seed 000 Table 2: affine collapses to 10.00%."""
    group_size: int = 0
    """DBN group size G; 0 = half the global batch (seed 000 §4.1). Needs global batch − 1 ≥ G."""
    dbn_eps: float = 1e-9
    """Added to each group covariance before Σ^{-1/2}; also the eigenvalue floor of the backward.

    Kept tiny for the reason seed 000 gives for BN's eps (§3.4.2): directions with variance below eps
    are not rescaled, so the MSE loss can shrink them into collapse. On digits, eps=1e-5 collapsed within
    40 steps while 1e-9 stayed white (std 1.00, corr 0.02; `largessl repro 000-table1`).
    """
    whitening: Literal["eigh", "newton_schulz"] = "eigh"
    """Σ^{-1/2} by eigendecomposition (exact ZCA) or Newton–Schulz iterations (approximate, matmuls only)."""
    ns_iters: int = 5
    """Newton–Schulz iterations when whitening=newton_schulz."""
    loss: Literal["mse", "cosine"] = "mse"
    """ℓ: squared error ||z1 − z2||² (default) or cosine (2 − 2 cos, i.e. squared error of unit vectors)."""
    inv_weight: float = 1.0
    """Weight of ℓ, the concise framework's only loss term (Def. 1); must be > 0 (0 would leave nothing to train)."""
    seed: int = 0
    """Base seed of Shuffled-DBN's per-step permutation (drawn from (seed, step))."""

    def validate(self) -> None:
        """Check values that do not depend on the batch size."""
        if self.projector != "auto":
            parse_dims(self.projector)
        check_weights({"inv_weight": self.inv_weight})
        if self.bn_eps < 0 or self.dbn_eps < 0:
            raise ValueError("method.bn_eps and method.dbn_eps must be >= 0")
        if self.group_size < 0:
            raise ValueError(f"method.group_size must be >= 1, or 0 for half the global batch (got {self.group_size})")
        if self.ns_iters < 1:
            raise ValueError(f"method.ns_iters must be >= 1 (got {self.ns_iters})")

    def check_plan(self, global_batch_size: int, per_rank_batch_size: int) -> None:
        """DBN's rank bound: the global batch must exceed the group size (B − 1 ≥ G)."""
        if self.head not in ("dbn", "shuffled_dbn"):
            return
        g = self.group_size or global_batch_size // 2
        if self.projector != "auto":
            g = min(g, parse_dims(self.projector)[-1])
        if global_batch_size - 1 < g:
            raise ValueError(
                f"method.head={self.head} with group size G={g} needs train.global_batch_size >= G+1={g + 1} "
                f"(rank bound B−1 ≥ G, seed 000 §3.4.3) but it is {global_batch_size}; lower method.group_size "
                "(0 = half the global batch) or raise train.global_batch_size"
            )


def loss(z_a: torch.Tensor, z_b: torch.Tensor, kind: str = "mse", group: ProcessGroup | None = None,
         inv_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """inv_weight · ℓ(z_a, z_b) averaged over the global batch: ℓ = ||z_a − z_b||² (mse) or 2 − 2cos (cosine).

    The reported term is ℓ itself (unweighted).
    """
    check_pair(z_a, z_b, "the decorrelation loss")
    check_weights({"inv_weight": inv_weight})
    with full_precision(z_a):
        z_a, z_b = as_loss_dtype(z_a), as_loss_dtype(z_b)
        if kind == "mse":
            per_sample = (z_a - z_b).pow(2).sum(1)
        elif kind == "cosine":
            per_sample = 2 - 2 * F.cosine_similarity(z_a, z_b, dim=1)
        else:
            raise ValueError(f"unknown decorrelation loss {kind!r}; valid losses: mse, cosine")
        count = z_a.new_full((1,), float(z_a.shape[0]))
        packed = all_reduce_sum(torch.cat([per_sample.sum().reshape(1), count]), group)
        term = packed[0] / packed[1]
    return inv_weight * term, {kind: term.detach()}


def build_head(cfg: DecorrelationConfig, dim: int, group: ProcessGroup | None) -> nn.Module:
    """The normalisation layer at the projector output selected by ``cfg.head``."""
    if cfg.head == "none":
        return nn.Identity()
    if cfg.head == "bn":
        return GlobalBatchNorm1d(dim, eps=cfg.bn_eps, affine=cfg.bn_affine, group=group)
    if cfg.head == "dbn":
        return DBN(dim, cfg.group_size, cfg.dbn_eps, method=cfg.whitening, ns_iters=cfg.ns_iters, group=group)
    if cfg.head == "shuffled_dbn":
        return ShuffledDBN(dim, cfg.group_size, cfg.dbn_eps, method=cfg.whitening, ns_iters=cfg.ns_iters,
                           seed=cfg.seed, group=group)
    raise ValueError(f"unknown method.head {cfg.head!r}; valid heads: {', '.join(HEAD_KINDS)}")


@METHODS.register("decorrelation", config=DecorrelationConfig)
class Decorrelation(SSLMethod):
    """Backbone → projector → BN/DBN/Shuffled-DBN head → squared error between the two views."""

    cfg: DecorrelationConfig

    def build_heads(self, width: int) -> None:
        """Projector (seed 000's 2F-2F-F by default), then the normalisation head."""
        cfg = self.cfg
        dims = [2 * width, 2 * width, width] if cfg.projector == "auto" else parse_dims(cfg.projector)
        self.projector = mlp(width, dims, group=self.group)
        self.head = build_head(cfg, dims[-1], self.group)

    def embed(self, x: torch.Tensor, step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone features, normalised projection) of one view."""
        f = backbone_features(self.backbone, x)
        p = self.projector(f)
        z = self.head(p, step) if isinstance(self.head, ShuffledDBN) else self.head(p)
        return f, z

    def forward(self, views: list[torch.Tensor], step: int | None = None) -> MethodOutput:
        """Loss of the two views; both views use the same Shuffled-DBN permutation (same step)."""
        require_views("decorrelation", views, 2)
        if step is None and isinstance(self.head, ShuffledDBN) and self.training:
            # Without the trainer's step, derive one from the layer's counter (identical on every rank,
            # checkpointed) so both views of this call share a permutation: it advances by 2 per call.
            step = int(self.head.num_batches_tracked) // 2
        out = []
        for i, v in enumerate(views):
            try:
                out.append(self.embed(v, step))
            except FloatingPointError as e:  # DBN's eigendecomposition refuses NaN/Inf before the loss sees it
                raise FloatingPointError(
                    f"decorrelation: non-finite loss term(s) {self.cfg.loss} at step {step}; the embeddings of "
                    f"view(s) [{i}] hold NaN/Inf before the {self.cfg.head} head: {e}"
                ) from None
        (f_a, z_a), (_, z_b) = out
        total, terms = loss(z_a, z_b, self.cfg.loss, self.group, self.cfg.inv_weight)
        return method_output("decorrelation", total, terms, step, [z_a, z_b], f_a)
