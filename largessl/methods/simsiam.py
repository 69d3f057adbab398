"""SimSiam and the diagnostic Siamese variants of "How does SimSiam avoid collapse without negative
samples?" (Zhang et al., ICLR 2022), on top of SimSiam (Chen & He, CVPR 2021).

Paper → code (seed 004):
- Eq. 2, SimSiam: L = D(P_a, sg(Z_b))/2 + D(P_b, sg(Z_a))/2, D = negative cosine → ``variant="simsiam"``
- Table 2 diagnostics (all collapse):
  Naive Siamese (no predictor): D(Z_a, sg(Z_b))/2 + D(Z_b, sg(Z_a))/2        → ``variant="naive"``
  Mirror SimSiam (App. Alg. 2): P_b = h(sg(Z_b)); D(Z_a, P_b)/2 + D(Z_b, P_a)/2 → ``variant="mirror"``
  Symmetric predictor (App. Alg. 3): D(P_a, sg(P_b))/2 + D(P_b, sg(P_a))/2     → ``variant="symmetric"``
- §4 / Table 5 simplified predictors: MLP (default), FC+FC+Bias, Tanh-constrained FC, a single bias
  → ``predictor``; these need an l2-normalisation at the encoder output → ``normalize_z``.
- Projector (SimSiam): Linear-BN-ReLU ×2, Linear, BN (no affine) → ``mlp(..., last_bn=True)``.

Distributed: projector/predictor BNs use global-batch statistics; the loss is a sum over the global batch
divided by the real gathered N.
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
    encode_views,
    full_precision,
    method_output,
    require_views,
)
from largessl.methods.heads import PREDICTORS, mlp, parse_dims, predictor

VARIANTS = ("simsiam", "mirror", "naive", "symmetric")


@dataclass
class SimSiamConfig(MethodConfig):
    """SimSiam hyper-parameters (ImageNet defaults) and seed 004's variants."""

    name: str = "simsiam"
    """Method name."""
    projector: str = "2048-2048-2048"
    """Projector widths (Linear-BN-ReLU for hidden layers, BN without affine after the last Linear)."""
    predictor: Literal["mlp", "fc_fc_bias", "tanh_fc", "bias"] = "mlp"
    """Predictor h: mlp (Linear-BN-ReLU-Linear), fc_fc_bias, tanh_fc (single FC, tanh-bounded weight), bias."""
    predictor_hidden: int = 512
    """Bottleneck width of the mlp and fc_fc_bias predictors."""
    variant: Literal["simsiam", "mirror", "naive", "symmetric"] = "simsiam"
    """Where the stop-gradient and the predictor sit (seed 004 Table 2); only simsiam avoids collapse."""
    normalize_z: bool | None = None
    """l2-normalise the encoder output before the predictor; None = on for the simplified predictors (§4)."""

    def validate(self) -> None:
        """Check the projector spec and the predictor width."""
        parse_dims(self.projector)
        if self.predictor_hidden < 1:
            raise ValueError(f"method.predictor_hidden must be >= 1 (got {self.predictor_hidden})")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown method.predictor {self.predictor!r}; valid: {', '.join(PREDICTORS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown method.variant {self.variant!r}; valid: {', '.join(VARIANTS)}")

    def normalises_z(self) -> bool:
        """Whether the encoder output is l2-normalised (explicit setting, else on for simplified predictors)."""
        return self.predictor != "mlp" if self.normalize_z is None else self.normalize_z


def negative_cosine(p: torch.Tensor, z: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """D(p, z) = −mean over the global batch of cos(p_i, z_i); no stop-gradient here (callers place it)."""
    check_pair(p, z, "the negative-cosine loss")
    with full_precision(p):
        p, z = as_loss_dtype(p), as_loss_dtype(z)
        total = F.cosine_similarity(p, z, dim=1).sum().reshape(1)
        count = p.new_full((1,), float(p.shape[0]))
        packed = all_reduce_sum(torch.cat([total, count]), group)
        return -packed[0] / packed[1]


def loss(p_a: torch.Tensor | None, p_b: torch.Tensor | None, z_a: torch.Tensor, z_b: torch.Tensor,
         variant: str = "simsiam", group: ProcessGroup | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetrised loss of ``variant`` from predictions p and projections z (see the module docstring).

    For ``mirror``, p must be computed from detached z (``h(sg(z))``); the caller does that.
    """
    if variant == "simsiam":
        t_a, t_b = negative_cosine(p_a, z_b.detach(), group), negative_cosine(p_b, z_a.detach(), group)
    elif variant == "naive":
        t_a, t_b = negative_cosine(z_a, z_b.detach(), group), negative_cosine(z_b, z_a.detach(), group)
    elif variant == "mirror":
        t_a, t_b = negative_cosine(z_a, p_b, group), negative_cosine(z_b, p_a, group)
    elif variant == "symmetric":
        t_a, t_b = negative_cosine(p_a, p_b.detach(), group), negative_cosine(p_b, p_a.detach(), group)
    else:
        raise ValueError(f"unknown SimSiam variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    total = 0.5 * (t_a + t_b)
    return total, {"neg_cosine": total.detach()}


@METHODS.register("simsiam", config=SimSiamConfig)
class SimSiam(SSLMethod):
    """Backbone → projector (→ predictor) → negative cosine with stop-gradient, per ``variant``."""

    cfg: SimSiamConfig

    def build_heads(self, width: int) -> None:
        """Projector with a BN on its output, then the variant's predictor."""
        cfg = self.cfg
        dims = parse_dims(cfg.projector)
        self.projector = mlp(width, dims, group=self.group, last_bn=True)
        # Naive Siamese has no predictor at all (an unused one would break DDP's gradient reduction).
        self.predictor = None if cfg.variant == "naive" else predictor(cfg.predictor, dims[-1],
                                                                      cfg.predictor_hidden, self.group)

    def param_groups_hint(self) -> dict[str, list[nn.Parameter]]:
        """The predictor's parameters, which SimSiam trains with a constant learning rate."""
        return {"predictor": [] if self.predictor is None else list(self.predictor.parameters())}

    def collapse_space(self, z: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """The output whose collapse the variant is about: z, except p for the symmetric predictor.

        Seed 004 reads the symmetric predictor as a new encoder F = h∘f whose output p enters the loss on
        both paths; there the collapse shows in p (the loss reaches −1) while z may stay spread.
        """
        return p if self.cfg.variant == "symmetric" and p is not None else z

    def embed(self, x: torch.Tensor, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone features, :meth:`collapse_space` output) of one view."""
        f = backbone_features(self.backbone, x)
        z = self.projector(f)
        if self.cfg.normalises_z():
            z = F.normalize(z, dim=1)
        p = self.predictor(z) if self.predictor is not None and self.cfg.variant == "symmetric" else None
        return f, self.collapse_space(z, p)

    def forward(self, views: list[torch.Tensor], step: int | None = None) -> MethodOutput:
        """Loss of the two views."""
        require_views("simsiam", views, 2)
        feats, z = encode_views(self.backbone, self.projector, views)
        if self.cfg.normalises_z():
            z = [F.normalize(t, dim=1) for t in z]
        if self.predictor is None:
            p = [None, None]
        elif self.cfg.variant == "mirror":
            p = [self.predictor(t.detach()) for t in z]
        else:
            p = [self.predictor(t) for t in z]
        total, terms = loss(p[0], p[1], z[0], z[1], self.cfg.variant, self.group)
        watched = [self.collapse_space(zi, pi) for zi, pi in zip(z, p)]
        return method_output("simsiam", total, terms, step, watched, feats[0])
