"""SSL methods on one process: every registered method trains, losses equal the papers' pseudocode,
the diagnostic variants place their stop-gradients where seed 004 says, bad input fails clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largessl.config import load_config, plan_run
from largessl.methods import METHODS, barlow_twins, build_method, decorrelation, multiview, simsiam, vicreg
from largessl.methods.base import check_output

DT = torch.float64


class TinyBackbone(nn.Module):
    """A Linear 'backbone' with the timm-like num_features attribute."""

    def __init__(self, in_dim: int = 6, num_features: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_features)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


SMALL = {  # small heads so the tests stay fast; every other field is the method's default
    "barlow_twins": {"projector": "16-12"},
    "vicreg": {"projector": "16-12"},
    "decorrelation": {},  # auto projector: 16-16-8, Shuffled-DBN, G = batch/2
    "simsiam": {"projector": "16-12", "predictor_hidden": 4},
    "multiview": {"projector": "16-12", "num_views": 3},
}


def _views(m: int, n: int = 16, in_dim: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, in_dim, generator=g, dtype=DT) for _ in range(m)]


def _build(name: str, **overrides):
    cfg = METHODS.extra(name, "config")(**{**SMALL.get(name, {}), **overrides})
    torch.manual_seed(0)
    return cfg, build_method(cfg, TinyBackbone()).to(DT)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains(name):
    cfg, model = _build(name)
    m = getattr(cfg, "num_views", 2)
    out = model(_views(m), step=0)
    assert out.loss.dim() == 0 and out.loss.requires_grad and torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert len(out.embeddings) == m and all(not z.requires_grad for z in out.embeddings)
    assert out.features.shape == (16, 8) and not out.features.requires_grad
    assert out.metrics and all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    # The config round-trips through the typed loader with its registered name.
    views = ["data.num_views=4"] if name == "multiview" else []  # multiview's default M is 4
    assert type(load_config(None, [f"method.name={name}", *views]).method) is type(cfg)


# --- the papers' pseudocode ---------------------------------------------------------------------------


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """A view of the off-diagonal entries (so the pseudocode's in-place ``mul_`` reaches ``x``)."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:]


def test_barlow_twins_equals_algorithm_1():
    z_a, z_b = _views(2, n=32, in_dim=10, seed=1)
    lambd = 5e-3
    # seed 002, Algorithm 1, verbatim
    n, d = z_a.shape
    z_a_norm = (z_a - z_a.mean(0)) / z_a.std(0)
    z_b_norm = (z_b - z_b.mean(0)) / z_b.std(0)
    c = torch.mm(z_a_norm.T, z_b_norm) / n
    c_diff = (c - torch.eye(d, dtype=DT)).pow(2)
    _off_diagonal(c_diff).mul_(lambd)
    ref = c_diff.sum()
    ours, terms = barlow_twins.loss(z_a, z_b, lambd, eps=0.0)  # eps 0: Algorithm 1 exactly
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(terms["on_diag"] + lambd * terms["off_diag"], ref, rtol=1e-8, atol=1e-8)
    # the default eps (1e-5 under the square root) moves unit-scale embeddings by ~1e-5 relative
    default, _ = barlow_twins.loss(z_a, z_b, lambd)
    torch.testing.assert_close(default, ref, rtol=1e-4, atol=0)
    assert default != ref


def test_vicreg_equals_appendix_a():
    z_a, z_b = _views(2, n=32, in_dim=10, seed=2)
    z_a, z_b = 0.3 * z_a, 0.3 * z_b  # some dims below γ = 1 so the hinge is active
    # seed 003, Appendix A, verbatim
    n, d = z_a.shape
    sim_loss = F.mse_loss(z_a, z_b)
    std_z_a = torch.sqrt(z_a.var(dim=0) + 1e-04)
    std_z_b = torch.sqrt(z_b.var(dim=0) + 1e-04)
    std_loss = torch.mean(F.relu(1 - std_z_a)) + torch.mean(F.relu(1 - std_z_b))
    za = z_a - z_a.mean(dim=0)
    zb = z_b - z_b.mean(dim=0)
    cov_z_a = (za.T @ za) / (n - 1)
    cov_z_b = (zb.T @ zb) / (n - 1)
    cov_loss = _off_diagonal(cov_z_a).pow_(2).sum() / d + _off_diagonal(cov_z_b).pow_(2).sum() / d
    ref = 25.0 * sim_loss + 25.0 * std_loss + 1.0 * cov_loss
    ours, terms = vicreg.loss(z_a, z_b)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(terms["variance"], std_loss, rtol=1e-8, atol=1e-8)
    assert terms["variance"] > 0


# --- every loss term's weight: 0 removes the term (computed independently here) ----------------------------


def _std(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0)  # Algorithm 1's standardisation (the tests below pass eps=0)


def _bt_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = _std(z_a).T @ _std(z_b) / z_a.shape[0]
    return ((1 - torch.diagonal(c)) ** 2).sum(), (_off_diagonal(c.clone()) ** 2).sum()


def _vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def v(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()

    def c(z: torch.Tensor) -> torch.Tensor:
        zc = z - z.mean(0)
        return (_off_diagonal((zc.T @ zc / (z.shape[0] - 1)).clone()) ** 2).sum() / z.shape[1]

    return F.mse_loss(z_a, z_b), v(z_a) + v(z_b), c(z_a) + c(z_b)


def _forbid(monkeypatch, module, name: str = "global_gram") -> None:
    """Make ``module.name`` raise: a term whose weight is 0 must not form its D×D matrix."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} called although its term has weight 0")

    monkeypatch.setattr(module, name, refuse)


def test_barlow_twins_term_weights(monkeypatch):
    z_a, z_b = _views(2, n=24, in_dim=7, seed=11)
    on, off = _bt_terms(z_a, z_b)
    got, terms = barlow_twins.loss(z_a, z_b, 0.02, eps=0.0, on_diag_weight=0.0)  # seed 002 Table 5 "only off-diag"
    torch.testing.assert_close(got, 0.02 * off, rtol=1e-10, atol=1e-12)
    weighted, _ = barlow_twins.loss(z_a, z_b, 0.02, eps=0.0, on_diag_weight=3.0)
    torch.testing.assert_close(weighted, 3.0 * on + 0.02 * off, rtol=1e-10, atol=1e-12)
    _forbid(monkeypatch, barlow_twins)  # λ = 0: only diag(C), never the D×D matrix
    got, terms = barlow_twins.loss(z_a, z_b, 0.0, eps=0.0)
    torch.testing.assert_close(got, on, rtol=1e-10, atol=1e-12)
    assert set(terms) == {"on_diag"}
    with pytest.raises(ValueError, match="every loss-term weight is 0"):
        barlow_twins.loss(z_a, z_b, 0.0, on_diag_weight=0.0)
    with pytest.raises(ValueError, match="method.on_diag_weight must be >= 0"):
        load_config(None, ["method.on_diag_weight=-1"])


@pytest.mark.parametrize("zero", ["sim_coeff", "std_coeff", "cov_coeff"])
def test_vicreg_term_weights(zero, monkeypatch):
    z_a, z_b = (0.3 * z for z in _views(2, n=24, in_dim=7, seed=12))  # hinge active on some dims
    sim, var, cov = _vicreg_terms(z_a, z_b)
    coeffs = {"sim_coeff": 2.0, "std_coeff": 3.0, "cov_coeff": 5.0, zero: 0.0}
    expected = {"sim_coeff": sim, "std_coeff": var, "cov_coeff": cov}
    ref = sum(coeffs[k] * expected[k] for k in coeffs if k != zero)
    if zero == "cov_coeff":
        _forbid(monkeypatch, vicreg)
    got, terms = vicreg.loss(z_a, z_b, **coeffs)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    skipped = {"sim_coeff": "invariance", "std_coeff": "variance", "cov_coeff": "covariance"}[zero]
    assert skipped not in terms and len(terms) == 2


def test_vicreg_std_term_reference_halves_the_variance_term():
    z_a, z_b = (0.3 * z for z in _views(2, n=32, in_dim=10, seed=13))
    # the reference implementation (facebookresearch/vicreg, VICReg.forward), restated: each view's hinge / 2
    x, y = z_a - z_a.mean(0), z_b - z_b.mean(0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 1e-4), torch.sqrt(y.var(dim=0) + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (32 - 1), y.T @ y / (32 - 1)
    cov_loss = (_off_diagonal(cov_x.clone()) ** 2).sum() / 10 + (_off_diagonal(cov_y.clone()) ** 2).sum() / 10
    ref = 25.0 * F.mse_loss(z_a, z_b) + 25.0 * std_loss + 1.0 * cov_loss
    got, terms = vicreg.loss(z_a, z_b, std_term="reference")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    paper, paper_terms = vicreg.loss(z_a, z_b)
    torch.testing.assert_close(paper_terms["variance"], 2 * terms["variance"])
    assert paper > got
    _, model = _build("vicreg", std_term="reference")
    views = _views(2)
    z = [model.projector(model.backbone(v)) for v in views]
    torch.testing.assert_close(model(views, step=0).loss, vicreg.loss(*z, std_term="reference")[0])
    with pytest.raises(ValueError, match="method.std_term.*allowed: paper, reference"):
        load_config(None, ["method.name=vicreg", "method.std_term=code"])


@pytest.mark.parametrize("zero", ["on_diag_weight", "lambd"])
def test_multiview_bt_term_weights(zero, monkeypatch):
    zs = _views(3, n=20, in_dim=6, seed=14)
    z_bar = sum(zs) / 3
    inv = sum(((1 - (_std(z) * _std(z_bar)).sum(0) / 20) ** 2).sum() for z in zs) / 3
    reg = (_off_diagonal((_std(z_bar).T @ _std(z_bar) / 20).clone()) ** 2).sum()
    if zero == "lambd":
        _forbid(monkeypatch, multiview)
        got, terms = multiview.loss(zs, "barlow_twins", 0.0, eps=0.0)
        torch.testing.assert_close(got, inv, rtol=1e-10, atol=1e-12)
        assert set(terms) == {"invariance"}
    else:
        calls = []  # count standardisations: only z̄'s is needed without the invariance term
        monkeypatch.setattr(multiview, "standardise",
                            lambda z, g, e: calls.append(1) or barlow_twins.standardise(z, g, e))
        got, terms = multiview.loss(zs, "barlow_twins", 0.1, eps=0.0, on_diag_weight=0.0)
        torch.testing.assert_close(got, 0.1 * reg, rtol=1e-10, atol=1e-12)
        assert set(terms) == {"off_diag"} and len(calls) == 1  # the M per-view standardisations are skipped
    with pytest.raises(ValueError, match="every loss-term weight is 0"):
        multiview.loss(zs, "barlow_twins", 0.0, on_diag_weight=0.0)


@pytest.mark.parametrize("zero", ["sim_coeff", "std_coeff", "cov_coeff"])
def test_multiview_vicreg_term_weights(zero):
    zs = [0.3 * z for z in _views(3, n=20, in_dim=6, seed=15)]
    z_bar = sum(zs) / 3
    zc = z_bar - z_bar.mean(0)
    parts = {"sim_coeff": sum(F.mse_loss(z, z_bar) for z in zs) / 3,
             "std_coeff": F.relu(1 - torch.sqrt(z_bar.var(0) + 1e-4)).mean(),
             "cov_coeff": (_off_diagonal((zc.T @ zc / 19).clone()) ** 2).sum() / 6}
    coeffs = {"sim_coeff": 2.0, "std_coeff": 3.0, "cov_coeff": 4.0, zero: 0.0}
    got, terms = multiview.loss(zs, "vicreg", **coeffs)
    torch.testing.assert_close(got, sum(coeffs[k] * parts[k] for k in parts if k != zero), rtol=1e-10, atol=1e-12)
    assert len(terms) == 2


def test_decorrelation_inv_weight():
    z_a, z_b = _views(2, n=8, in_dim=5, seed=16)
    got, terms = decorrelation.loss(z_a, z_b, "mse", inv_weight=0.5)
    torch.testing.assert_close(got, 0.5 * ((z_a - z_b) ** 2).sum(1).mean())
    torch.testing.assert_close(terms["mse"], ((z_a - z_b) ** 2).sum(1).mean())  # the term is reported unweighted
    with pytest.raises(ValueError, match="every loss-term weight is 0.*method.inv_weight"):
        load_config(None, ["method.name=decorrelation", "method.inv_weight=0"])


@pytest.mark.parametrize("name,weights", [
    ("barlow_twins", {"on_diag_weight": 0.0, "lambd": 0.3}),
    ("vicreg", {"sim_coeff": 0.0, "std_coeff": 2.0, "cov_coeff": 0.5}),
    ("multiview", {"on_diag_weight": 2.0, "lambd": 0.0}),
    ("decorrelation", {"inv_weight": 3.0}),
])
def test_weights_reach_the_module_loss(name, weights):
    cfg, model = _build(name, **weights)
    m = getattr(cfg, "num_views", 2)
    views = _views(m)
    out = model(views, step=0)
    _, ref_model = _build(name)  # same seed, same parameters; paper weights
    if name == "decorrelation":
        ref = 3.0 * ref_model(views, step=0).loss
    else:
        with torch.no_grad():
            z = [ref_model.projector(ref_model.backbone(v)) for v in views]
        fn = {"barlow_twins": lambda: barlow_twins.loss(*z, 0.3, on_diag_weight=0.0),
              "vicreg": lambda: vicreg.loss(*z, 0.0, 2.0, 0.5),
              "multiview": lambda: multiview.loss(z, lambd=0.0, on_diag_weight=2.0)}[name]
        ref = fn()[0]
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    out.loss.backward()


# --- Barlow Twins' eps: a dead dimension stays finite ------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_barlow_twins_dead_dimension_is_finite_at_the_default_eps(value):
    z_a, z_b = (z.float() for z in _views(2, n=32, in_dim=10, seed=17))
    z_a[:, 3] = value  # a dead projector output: constant over the batch in one view
    z_a, z_b = z_a.requires_grad_(), z_b.requires_grad_()
    total, terms = barlow_twins.loss(z_a, z_b)  # the default eps
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z_a.grad).all() and torch.isfinite(z_b.grad).all()
    assert terms["on_diag"] >= 0.99  # the dead dimension's C_ii is ~0: a full unit of invariance loss
    if value == 0.0:  # Algorithm 1 (eps 0) on an exactly-zero dimension: 0 · rsqrt(0) = NaN
        nan, _ = barlow_twins.loss(z_a.detach(), z_b.detach(), eps=0.0)
        assert torch.isnan(nan)
    # the same through the module: a projector whose last layer has a zero row
    cfg, model = _build("barlow_twins")
    with torch.no_grad():
        model.projector[-1].weight[5].zero_()
    out = model(_views(2), step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert cfg.eps == 1e-5 and METHODS.extra("multiview", "config")().eps == 1e-5


def test_decorrelation_losses():
    z_a, z_b = _views(2, n=8, in_dim=5, seed=3)
    mse, _ = decorrelation.loss(z_a, z_b, "mse")
    torch.testing.assert_close(mse, ((z_a - z_b) ** 2).sum(1).mean())
    cos, _ = decorrelation.loss(z_a, z_b, "cosine")
    torch.testing.assert_close(cos, (F.normalize(z_a, dim=1) - F.normalize(z_b, dim=1)).pow(2).sum(1).mean())


@pytest.mark.parametrize("head", decorrelation.HEAD_KINDS)
def test_decorrelation_heads_normalise_as_seed_000_says(head):
    cfg, model = _build("decorrelation", head=head, projector="16-6", group_size=3, dbn_eps=0.0)
    out = model(_views(2, n=32), step=4)
    z = out.embeddings[0]
    zc = z - z.mean(0)
    cov = zc.T @ zc / z.shape[0]
    if head == "bn":  # eps = 0, no affine: exactly unit variance
        torch.testing.assert_close(torch.diagonal(cov), torch.ones(6, dtype=DT))
    if head == "dbn":  # groups of 3 are white
        torch.testing.assert_close(cov[:3, :3], torch.eye(3, dtype=DT), rtol=0, atol=1e-6)
    if head == "shuffled_dbn":  # unit variance on every dim, whatever the grouping
        torch.testing.assert_close(torch.diagonal(cov), torch.ones(6, dtype=DT), rtol=0, atol=1e-6)
    out.loss.backward()


def test_decorrelation_bn_options_reach_the_layer():
    _, model = _build("decorrelation", head="bn", bn_eps=0.1, bn_affine=True)
    assert model.head.eps == 0.1 and model.head.affine
    _, auto = _build("decorrelation", head="none")
    widths = [m.out_features for m in auto.projector if isinstance(m, nn.Linear)]
    assert widths == [16, 16, 8]  # seed 000: hidden 2× input, output = input
    _, two_d = _build("decorrelation", head="dbn", projector="16-16-2", group_size=2)
    assert two_d(_views(2), step=0).embeddings[0].shape == (16, 2)  # seed 000 §3.2's 2-D projection


def test_multiview_equals_explicit_formulas():
    zs = _views(4, n=20, in_dim=6, seed=4)
    z_bar = sum(zs) / 4

    def std(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / z.std(0)

    lam = 0.02
    inv = sum(((1 - (std(z) * std(z_bar)).sum(0) / 20) ** 2).sum() for z in zs) / 4
    c = std(z_bar).T @ std(z_bar) / 20
    ref = inv + lam * (_off_diagonal(c) ** 2).sum()
    ours, terms = multiview.loss(zs, "barlow_twins", lam, eps=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    default_lambda, _ = multiview.loss(zs, "barlow_twins", None, eps=0.0)  # λ = 1/pdim
    torch.testing.assert_close(default_lambda, inv + (_off_diagonal(c) ** 2).sum() / 6, rtol=1e-8, atol=1e-8)
    # VICReg style: invariance to the mean + VICReg regulariser of the mean embedding only.
    inv_v = sum(F.mse_loss(z, z_bar) for z in zs) / 4
    v, cov = vicreg.variance_covariance(z_bar)
    ours_v, _ = multiview.loss(zs, "vicreg", sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    torch.testing.assert_close(ours_v, 2.0 * inv_v + 3.0 * v + 4.0 * cov, rtol=1e-8, atol=1e-8)


def test_multiview_with_vicreg_regularizer_trains():
    cfg, model = _build("multiview", regularizer="vicreg", num_views=4)
    out = model(_views(4), step=1)
    out.loss.backward()
    assert set(out.metrics) == {"invariance", "variance", "covariance"}


# --- SimSiam and the diagnostic variants (seed 004) ------------------------------------------------------


def _grads(variant: str) -> dict[str, torch.Tensor | None]:
    z_a, z_b, p_a, p_b = (t.requires_grad_() for t in _views(4, n=6, in_dim=5, seed=5))
    use_p = variant != "naive"
    total, _ = simsiam.loss(p_a if use_p else None, p_b if use_p else None, z_a, z_b, variant)
    total.backward()
    return {"z_a": z_a.grad, "z_b": z_b.grad, "p_a": p_a.grad, "p_b": p_b.grad}


def test_simsiam_stop_gradient_placement():
    g = _grads("simsiam")  # gradient only through the predictor path
    assert g["z_a"] is None and g["z_b"] is None and g["p_a"] is not None and g["p_b"] is not None
    g = _grads("naive")  # no predictor; z receives the gradient
    assert g["z_a"] is not None and g["z_b"] is not None
    g = _grads("mirror")  # z and p both receive gradient (stop-gradient sits at the predictor input)
    assert all(g[k] is not None for k in ("z_a", "z_b", "p_a", "p_b"))
    g = _grads("symmetric")  # only the predictions receive gradient
    assert g["z_a"] is None and g["p_a"] is not None


def test_simsiam_loss_value():
    z_a, z_b, p_a, p_b = _views(4, n=6, in_dim=5, seed=6)
    ref = -(F.cosine_similarity(p_a, z_b).mean() + F.cosine_similarity(p_b, z_a).mean()) / 2
    torch.testing.assert_close(simsiam.loss(p_a, p_b, z_a, z_b)[0], ref)


def test_mirror_predictor_sees_detached_input():
    """Mirror SimSiam (seed 004, App. Alg. 2) computes P = h(sg(Z)): the predictor learns, but the encoder gets
    gradient only through Z's own slot in D(Z_a, P_b), never back through the predictor. The encoder's gradient
    must equal the one where the predictions are constants; a missing ``.detach()`` adds the predictor path."""
    views = _views(2)
    _, model = _build("simsiam", variant="mirror")
    model(views, step=0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.predictor.parameters())
    got = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}
    model.zero_grad(set_to_none=True)
    z = [model.projector(model.backbone(v)) for v in views]
    if model.cfg.normalises_z():
        z = [F.normalize(t, dim=1) for t in z]
    with torch.no_grad():
        p = [model.predictor(t) for t in z]  # constants: no path back to the encoder
    simsiam.loss(p[0], p[1], z[0], z[1], "mirror")[0].backward()
    for n, q in model.backbone.named_parameters():
        torch.testing.assert_close(got[n], q.grad, msg=f"{n}: encoder gradient flows through the predictor")


@pytest.mark.parametrize("pred", ["mlp", "fc_fc_bias", "tanh_fc", "bias"])
@pytest.mark.parametrize("variant", ["simsiam", "mirror", "naive", "symmetric"])
def test_simsiam_predictors_and_variants(pred, variant):
    cfg, model = _build("simsiam", predictor=pred, variant=variant)
    out = model(_views(2), step=0)
    out.loss.backward()
    hint = model.param_groups_hint()["predictor"]
    if variant == "naive":
        assert model.predictor is None and hint == []
    else:
        assert {id(p) for p in hint} == {id(p) for p in model.predictor.parameters()} and hint
    # collapse is watched on what the loss compares on the gradient path: p for the symmetric predictor, else z
    views = _views(2)
    with torch.no_grad():
        z = model.projector(model.backbone(views[0]))
        if model.cfg.normalises_z():
            z = F.normalize(z, dim=1)
        watched = model.predictor(z) if variant == "symmetric" else z
        torch.testing.assert_close(model.embed(views[0])[1], watched)
        torch.testing.assert_close(out.embeddings[0], watched)
    if pred != "mlp" and variant != "symmetric":  # seed 004 §4: simplified predictors need an l2-normalised z
        assert torch.allclose(out.embeddings[0].norm(dim=1), torch.ones(16, dtype=DT))
    if pred == "tanh_fc" and variant != "naive":
        with torch.no_grad():
            model.predictor.linear.weight.mul_(100)
            y = model.predictor(torch.eye(12, dtype=DT)) - model.predictor.linear.bias
        assert y.abs().max() <= 1.0


# --- bad input ---------------------------------------------------------------------------------------------


def test_dbn_rank_bound_fails_at_start_up_and_at_run_time():
    cfg = load_config(None, ["method.name=decorrelation", "method.group_size=64", "method.head=dbn",
                             "train.global_batch_size=64"])
    with pytest.raises(ValueError, match=r"global_batch_size >= G\+1=65.*rank bound"):
        plan_run(cfg, world_size=2, num_train_samples=1000)
    plan_run(dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, group_size=0)), 2, 1000)
    _, model = _build("decorrelation", head="shuffled_dbn", projector="16-12", group_size=12)
    with pytest.raises(ValueError, match="G=12 needs a global batch of at least"):
        model(_views(2, n=12), step=0)


def test_nan_embeddings_name_the_step_and_the_term():
    for name in METHODS.names():
        cfg, model = _build(name)
        views = _views(getattr(cfg, "num_views", 2))
        views[1][3, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"non-finite loss term\(s\) .+ at step 17.*view\(s\) \[1\]"):
            model(views, step=17)
    _, model = _build("vicreg")
    out = model(_views(2), step=0)
    out.loss = out.loss * float("inf")
    with pytest.raises(FloatingPointError, match="vicreg: non-finite loss term.*at step 5"):
        check_output("vicreg", out, 5)


def test_projector_and_embedding_dim_mismatch():
    bad = TinyBackbone()
    bad.num_features = 7  # declares 7, returns 8
    cfg = METHODS.extra("vicreg", "config")(projector="16-12")
    with pytest.raises(ValueError, match="num_features=7"):
        build_method(cfg, bad).to(DT)(_views(2), step=0)
    nameless = nn.Linear(6, 8)
    with pytest.raises(ValueError, match="must have an int attribute num_features"):
        build_method(cfg, nameless)
    with pytest.raises(ValueError, match="equal shape"):
        barlow_twins.loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="equal shape"):
        vicreg.loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="equal shape"):
        multiview.loss([torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2)])
    with pytest.raises(ValueError, match="method.projector"):
        METHODS.extra("barlow_twins", "config")(projector="8192-x").validate()


def test_unknown_method_and_config_key_and_wrong_view_count():
    with pytest.raises(ValueError, match="unknown method 'byol'.*decorrelation.*multiview.*simsiam.*vicreg"):
        load_config(None, ["method.name=byol"])
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        METHODS.get("byol")
    with pytest.raises(ValueError, match=r"unknown config key 'method.lambd'.*sim_coeff"):
        load_config(None, ["method.name=vicreg", "method.lambd=0.1"])
    with pytest.raises(ValueError, match="method.head.*allowed: none, bn, dbn, shuffled_dbn"):
        load_config(None, ["method.name=decorrelation", "method.head=zca"])
    with pytest.raises(ValueError, match="method.num_views=3 but data.num_views"):
        load_config(None, ["method.name=multiview", "method.num_views=3"])
    _, model = _build("multiview")
    with pytest.raises(ValueError, match="method.num_views=3 views, got 2"):
        model(_views(2), step=0)
    _, bt = _build("barlow_twins")
    with pytest.raises(ValueError, match="expects 2 views, got 3"):
        bt(_views(3), step=0)
    with pytest.raises(ValueError, match="needs a VICRegConfig"):
        build_method(dataclasses.replace(METHODS.extra("barlow_twins", "config")(), name="vicreg"), TinyBackbone())


def test_losses_run_in_fp32_under_autocast():
    z_a, z_b = (z.float() for z in _views(2, n=16, in_dim=8, seed=7))
    ref, _ = barlow_twins.loss(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = barlow_twins.loss(z_a.bfloat16(), z_b.bfloat16())
        got_v, _ = vicreg.loss(z_a.bfloat16(), z_b.bfloat16())
    assert got.dtype == torch.float32 and got_v.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)  # only the bf16 rounding of the inputs differs


def test_shuffled_dbn_views_share_a_permutation_without_a_step():
    _, model = _build("decorrelation", projector="16-12", group_size=4)
    views = _views(1) * 2  # the same batch twice: identical outputs only if both views use one permutation
    first = model(views, step=None)
    assert first.loss.item() == pytest.approx(0.0, abs=1e-20)
    second = model(views, step=None)
    assert not torch.allclose(first.embeddings[0], second.embeddings[0])  # a new permutation per call
