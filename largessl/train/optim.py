"""Optimizers (LARS, SGD, AdamW) and the parameter groups of the SSL recipes.

Groups (each carries ``name``, ``peak_lr`` and ``schedule`` for :mod:`largessl.train.schedules`):
- ``weights``: matrices and conv kernels; weight decay and, with LARS, trust-ratio adaptation.
- ``bias_norm``: biases and normalisation parameters (ndim ≤ 1), and the tokens and position embeddings a
  model lists in its ``no_weight_decay()`` (timm ViTs: ``pos_embed``, ``cls_token``, ...); no LARS adaptation,
  their own lr (Barlow Twins: 0.0048 × batch/256 vs 0.2 × batch/256 for the weights) and no weight decay unless
  ``optim.exclude_bias_norm_from_wd`` is false (SimSiam's reference decays every parameter).
- ``predictor`` / ``predictor_bias_norm``: a method's predictor (``param_groups_hint()["predictor"]``) kept at
  a constant lr when ``optim.fixed_predictor_lr`` is set (SimSiam).

LARS under DeepSpeed ZeRO-1/2: ZeRO flattens each group into one fp32 buffer and hands every rank only a
slice of it, so a naive LARS would compute one trust ratio per rank-slice instead of one per layer.
:func:`largessl.train.deepspeed_engine.attach_zero_layout` gives LARS the layer boundaries inside its slice; the per-layer norms are then
summed over the data-parallel group (one all-reduce of 2 floats per layer per step), which reproduces the
DDP update exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from largessl.distributed.collectives import all_reduce_sum_no_grad
from largessl.train.config import OptimConfig

log = logging.getLogger(__name__)


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as used by Barlow Twins and VICReg.

    Per parameter of a group with ``lars_adapt``: u = g + wd·p; u ← u · η‖p‖/‖u‖ (1 when either norm is 0);
    μ ← m·μ + u; p ← p − lr·μ. Groups without ``lars_adapt`` skip the trust ratio (and use wd = 0 in the recipes).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 1e-3, lars_adapt: bool = True, foreach: bool = True) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters lr={lr} wd={weight_decay} momentum={momentum} eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      lars_adapt=lars_adapt))
        self.foreach = foreach
        """Update each group's plain parameters with multi-tensor ``torch._foreach_*`` kernels (a few
        launches per group, trust ratios from one stacked norm vector, no host sync) instead of a loop."""
        # id(flat fp32 partition) -> (segments [(layer index, offset, length)], number of layers, dp group)
        self._zero_layout: dict[int, tuple[list[tuple[int, int, int]], int, Any]] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain = [p for p in group["params"] if p.grad is not None and id(p) not in self._zero_layout]
            zero = [p for p in group["params"] if p.grad is not None and id(p) in self._zero_layout]
            if self.foreach and plain:
                self._foreach_update(group, plain)
            else:
                zero = plain + zero
            for p in zero:
                self._single_update(group, p)
        return loss

    def _momentum(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p)
            out.append(state["mu"])
        return out

    def _single_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        update = p.grad
        if group["weight_decay"] != 0:
            update = update.add(p, alpha=group["weight_decay"])
        if group["lars_adapt"]:
            layout = self._zero_layout.get(id(p))
            if layout is None:
                update = update * _trust_ratio(p.norm(), update.norm(), group["eta"])
            else:
                update = _zero_trust_scaled(p, update, group["eta"], *layout)
        (mu,) = self._momentum([p])
        mu.mul_(group["momentum"]).add_(update)
        p.add_(mu, alpha=-group["lr"])

    def _foreach_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            updates = grads  # read only below: the scaling makes new tensors, momentum adds from them
        if group["lars_adapt"]:
            ratios = _trust_ratio(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates)),
                                  group["eta"])
            updates = torch._foreach_mul(updates, list(ratios.unbind()))
        mus = self._momentum(params)
        torch._foreach_mul_(mus, group["momentum"])
        torch._foreach_add_(mus, updates)
        torch._foreach_add_(params, mus, alpha=-group["lr"])


def _trust_ratio(p_norm: torch.Tensor, u_norm: torch.Tensor, eta: float) -> torch.Tensor:
    one = torch.ones_like(p_norm)
    return torch.where(p_norm > 0, torch.where(u_norm > 0, eta * p_norm / u_norm, one), one)


def _zero_trust_scaled(flat_p: torch.Tensor, flat_u: torch.Tensor, eta: float,
                       segments: list[tuple[int, int, int]], num_layers: int, group: Any) -> torch.Tensor:
    """Scale each layer's slice of a ZeRO partition by that layer's global trust ratio."""
    sq = torch.zeros(2, num_layers, dtype=torch.float32, device=flat_p.device)
    for layer, off, n in segments:
        sq[0, layer] = flat_p[off:off + n].float().pow(2).sum()
        sq[1, layer] = flat_u[off:off + n].float().pow(2).sum()
    # Each rank holds disjoint slices, so summing partial squared norms gives the full per-layer norms.
    all_reduce_sum_no_grad(sq, group)
    ratios = _trust_ratio(sq[0].sqrt(), sq[1].sqrt(), eta)
    scale = torch.ones_like(flat_u)
    for layer, off, n in segments:
        scale[off:off + n] = ratios[layer]
    return flat_u * scale


def _is_bias_or_norm(name: str, p: nn.Parameter) -> bool:
    # ndim ≤ 1 covers biases and every BN/LN/GN scale and shift, as in the Barlow Twins reference.
    return p.ndim <= 1


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters that submodules declare weight-decay free (timm's ``no_weight_decay()``).

    A ViT's position embedding and class/register tokens are 3-d tensors, so the ndim rule misses them; shrinking
    them towards 0 (or LARS-scaling them like a weight matrix) is what the ViT recipes (DeiT, MAE, DINO) avoid.
    ResNets declare none, so their groups are unchanged.
    """
    names: set[str] = set()
    params = dict(module.named_parameters())
    for mod_name, mod in module.named_modules():
        declared = getattr(mod, "no_weight_decay", None)
        if not callable(declared):
            continue
        for n in declared():
            full = f"{mod_name}.{n}" if mod_name else n
            if full in params:  # timm lists names a given configuration may not have (dist_token, reg_token)
                names.add(full)
    return names


def param_groups(module: nn.Module, cfg: OptimConfig, lr: float, bias_norm_lr: float) -> list[dict[str, Any]]:
    """The recipe's parameter groups for ``module`` (empty groups are dropped)."""
    hint = getattr(module, "param_groups_hint", None)
    predictor_ids = set()
    if cfg.fixed_predictor_lr:
        if hint is None or "predictor" not in hint():
            raise ValueError("optim.fixed_predictor_lr=true needs a method with a predictor (e.g. simsiam); "
                             "set optim.fixed_predictor_lr=false")
        predictor_ids = {id(p) for p in hint()["predictor"]}
    buckets: dict[str, list[nn.Parameter]] = {"weights": [], "bias_norm": [], "predictor": [],
                                               "predictor_bias_norm": []}
    tokens = no_weight_decay_names(module)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        prefix = "predictor_" if id(p) in predictor_ids else ""
        if _is_bias_or_norm(name, p) or name in tokens:
            buckets[prefix + "bias_norm"].append(p)
        elif prefix:
            buckets["predictor"].append(p)
        else:
            buckets["weights"].append(p)
    bias_norm_wd = 0.0 if cfg.exclude_bias_norm_from_wd else cfg.weight_decay
    spec = {
        "weights": dict(peak_lr=lr, weight_decay=cfg.weight_decay, lars_adapt=True, schedule="cosine"),
        "bias_norm": dict(peak_lr=bias_norm_lr, weight_decay=bias_norm_wd, lars_adapt=False, schedule="cosine"),
        "predictor": dict(peak_lr=lr, weight_decay=cfg.weight_decay, lars_adapt=True, schedule="constant"),
        "predictor_bias_norm": dict(peak_lr=bias_norm_lr, weight_decay=bias_norm_wd, lars_adapt=False,
                                    schedule="constant"),
    }
    groups = []
    for name, params in buckets.items():
        if params:
            groups.append({"params": params, "name": name, "lr": spec[name]["peak_lr"], **spec[name]})
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float, bias_norm_lr: float) -> Optimizer:
    """The configured optimizer over :func:`param_groups` of ``module`` (lr is then set per step by schedules)."""
    groups = param_groups(module, cfg, lr, bias_norm_lr)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta)
    for g in groups:
        g.pop("lars_adapt")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        betas = tuple(cfg.betas) if cfg.betas else (0.9, 0.999)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optim.name {cfg.name!r}; allowed: lars, sgd, adamw")
