"""LARS against a hand-written reference, the recipe's parameter groups, and optimizer choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largessl.train.config import OptimConfig
from largessl.train.optim import LARS, build_optimizer, param_groups


def _reference_lars_step(p, g, mu, lr, wd, m, eta, adapt):
    """Barlow Twins' LARS written out (the reference algorithm) for one parameter."""
    d = g.clone()
    if adapt:
        d = d + wd * p
        pn, un = p.norm(), d.norm()
        q = torch.where(pn > 0, torch.where(un > 0, eta * pn / un, torch.ones_like(pn)), torch.ones_like(pn))
        d = d * q
    mu = m * mu + d
    return p - lr * mu, mu


@pytest.mark.parametrize("adapt", [True, False])
def test_lars_matches_reference(adapt):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    opt = LARS([{"params": [w], "lars_adapt": adapt, "weight_decay": 1e-2 if adapt else 0.0}],
               lr=0.5, momentum=0.9, eta=1e-3)
    ref, mu = w.detach().clone(), torch.zeros(5, 3)
    for _ in range(3):
        g = torch.randn(5, 3)
        w.grad = g.clone()
        opt.step()
        ref, mu = _reference_lars_step(ref, g, mu, 0.5, 1e-2 if adapt else 0.0, 0.9, 1e-3, adapt)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-6, atol=1e-7)


def test_lars_zero_weight_uses_unit_ratio():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([w], lr=1.0, momentum=0.0, eta=1e-3)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(3, 3))


class _WithPredictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.predictor = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def param_groups_hint(self):
        return {"predictor": list(self.predictor.parameters())}


def test_groups_exclude_bias_and_norm_and_fix_predictor():
    m = _WithPredictor()
    cfg = OptimConfig(name="lars", weight_decay=1.5e-6, fixed_predictor_lr=True)
    groups = {g["name"]: g for g in param_groups(m, cfg, lr=0.4, bias_norm_lr=0.01)}
    assert set(groups) == {"weights", "bias_norm", "predictor", "predictor_bias_norm"}
    assert groups["weights"]["params"] == [m.backbone[0].weight]
    assert {id(p) for p in groups["bias_norm"]["params"]} == {
        id(m.backbone[0].bias), id(m.backbone[1].weight), id(m.backbone[1].bias)}
    assert groups["bias_norm"]["weight_decay"] == 0 and not groups["bias_norm"]["lars_adapt"]
    assert groups["bias_norm"]["peak_lr"] == 0.01 and groups["weights"]["peak_lr"] == 0.4
    assert groups["predictor"]["schedule"] == "constant" and groups["weights"]["schedule"] == "cosine"
    n_all = sum(len(g["params"]) for g in groups.values())
    assert n_all == len(list(m.parameters()))


def test_fixed_predictor_lr_needs_a_predictor():
    with pytest.raises(ValueError, match="fixed_predictor_lr"):
        param_groups(nn.Linear(2, 2), OptimConfig(fixed_predictor_lr=True), 0.1, 0.1)


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_choice(name, cls):
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    cfg = OptimConfig(name=name, weight_decay=0.05, betas=[0.9, 0.95] if name == "adamw" else None)
    opt = build_optimizer(m, cfg, 0.1, 0.01)
    assert isinstance(opt, cls)
    x = torch.randn(4, 3)
    m(x).pow(2).sum().backward()
    before = m[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m[0].weight.detach())
    # The configured decay (not the optimizer's default, nor the recipe default 1.5e-6) on the Linear weight
    # only; biases and BatchNorm parameters get none.
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(m[0].weight): 0.05, id(m[0].bias): 0.0, id(m[1].weight): 0.0, id(m[1].bias): 0.0}
    if name == "adamw":
        assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_foreach_lars_equals_the_per_parameter_loop():
    """The multi-tensor path (default) makes bitwise the same updates as the loop, incl. a zero weight
    (trust ratio 1), a parameter without a gradient, and a non-adapted group."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Linear(3, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = []
    for m, foreach in zip(models, (False, True)):
        with torch.no_grad():
            m[2].weight.zero_()
        weights = [p for p in m.parameters() if p.ndim > 1]
        others = [p for p in m.parameters() if p.ndim == 1]
        opts.append(LARS([{"params": weights}, {"params": others, "lars_adapt": False, "weight_decay": 0.0, "lr": 0.1}],
                         lr=0.5, weight_decay=0.01, momentum=0.9, eta=0.02, foreach=foreach))
    x = torch.randn(8, 5)
    for _ in range(4):
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            m[:3](x).pow(2).sum().backward()  # the last Linear gets no gradient
            opt.step()
    changed = False
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(pa, pb)
        changed |= bool(pa.grad is not None)
    assert changed and models[1][3].weight.grad is None
    assert not torch.equal(models[1][2].weight, torch.zeros(3, 4)), "the zero weight moves with trust ratio 1"
