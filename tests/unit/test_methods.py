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
    ours, terms = barlow_twins.loss(z_a, z_b, lambd)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(terms["on_diag"] + lambd * terms["off_diag"], ref, rtol=1e-8, atol=1e-8)


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
    ours, terms = multiview.loss(zs, "barlow_twins", lam)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    default_lambda, _ = multiview.loss(zs, "barlow_twins", None)  # λ = 1/pdim
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
    _, model = _build("simsiam", variant="mirror")
    out = model(_views(2), step=0)
    out.loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())


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
