"""Global-batch statistics layers on one process: BN, DBN, Shuffled-DBN (seed 000 Def. 2–5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from largessl.nn import DBN, GlobalBatchNorm1d, ShuffledDBN, inv_sqrt_newton_schulz, inv_sqrt_psd
from largessl.nn.whitening import permutation_for_step


def _x(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0  # correlated, off-centre


def _cov(y: torch.Tensor) -> torch.Tensor:
    yc = y - y.mean(0)
    return yc.T @ yc / y.shape[0]


# --- GlobalBatchNorm1d -------------------------------------------------------------------------------


def test_bn_matches_torch_batchnorm_in_train_and_eval():
    x = _x(32, 6)
    ours, ref = GlobalBatchNorm1d(6).double(), nn.BatchNorm1d(6).double()
    for _ in range(3):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x[:5]), ref(x[:5]))


def test_bn_eps_and_affine_options():
    x = _x(16, 4)
    plain = GlobalBatchNorm1d(4, eps=0.0, affine=False).double()
    y = plain(x)
    assert list(dict(plain.named_parameters())) == []
    torch.testing.assert_close(y.pow(2).mean(0), torch.ones(4, dtype=torch.float64))  # eps=0: exactly unit variance
    y_eps = GlobalBatchNorm1d(4, eps=10.0, affine=False).double()(x)
    assert (y_eps.pow(2).mean(0) < 0.99).all()  # a large eps shrinks the output, seed 000 Table 2
    with pytest.raises(ValueError, match="eps must be >= 0"):
        GlobalBatchNorm1d(4, eps=-1.0)
    with pytest.raises(ValueError, match=r"expects \(N, 4\)"):
        plain(torch.randn(3, 5, dtype=torch.float64))


def test_bn_gradcheck():
    x = _x(6, 3).requires_grad_()
    bn = GlobalBatchNorm1d(3, eps=0.0).double()
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,))
    bn_affine = GlobalBatchNorm1d(3, eps=1e-3, affine=True).double()
    with torch.no_grad():
        bn_affine.weight.uniform_(0.5, 1.5)

    def f(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(bn_affine, {"weight": w, "bias": b}, (t,))

    w = bn_affine.weight.detach().clone().requires_grad_()
    b = bn_affine.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w, b))


# --- inverse square root -----------------------------------------------------------------------------


def test_inv_sqrt_psd_forward_and_stable_backward():
    a = _x(40, 5)
    sigma = _cov(a)
    w = inv_sqrt_psd(sigma)
    torch.testing.assert_close(w @ sigma @ w, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
    # autograd through eigh divides by λ_i − λ_j: with repeated eigenvalues it is not finite; ours is.
    s = torch.eye(4, dtype=torch.float64, requires_grad=True)
    (inv_sqrt_psd(s) * torch.arange(16.0, dtype=torch.float64).reshape(4, 4)).sum().backward()
    assert torch.isfinite(s.grad).all()
    # d tr(Σ^{-1/2}) / dΣ at Σ = I is −½ I.
    s2 = torch.eye(3, dtype=torch.float64, requires_grad=True)
    torch.diagonal(inv_sqrt_psd(s2)).sum().backward()
    torch.testing.assert_close(s2.grad, -0.5 * torch.eye(3, dtype=torch.float64))


def test_inv_sqrt_newton_schulz_approximates_eigh():
    sigma = _cov(_x(200, 4)) + 0.5 * torch.eye(4, dtype=torch.float64)
    exact = inv_sqrt_psd(sigma)
    approx = inv_sqrt_newton_schulz(sigma, iters=30)
    torch.testing.assert_close(approx, exact, rtol=1e-6, atol=1e-6)


# --- DBN / Shuffled-DBN --------------------------------------------------------------------------------


@pytest.mark.parametrize("d,g", [(12, 4), (10, 4), (6, 16)])
def test_dbn_output_covariance_is_identity_per_group(d, g):
    x = _x(64, d)
    dbn = DBN(d, group_size=g, eps=0.0).double()
    y = dbn(x)
    cov = _cov(y)
    g_eff = min(g, d)
    for start in range(0, d, g_eff):
        blk = cov[start:start + g_eff, start:start + g_eff]
        torch.testing.assert_close(blk, torch.eye(blk.shape[0], dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(y.mean(0), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-10)


def test_dbn_default_eps_still_white_within_1e4():
    y = DBN(8, group_size=8).double()(_x(128, 8))
    torch.testing.assert_close(_cov(y), torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-4)


def test_dbn_is_zca_of_each_group():
    x = _x(30, 6)
    y = DBN(6, group_size=3, eps=0.0).double()(x)
    xc = x - x.mean(0)
    for sl in (slice(0, 3), slice(3, 6)):
        lam, q = torch.linalg.eigh(_cov(x[:, sl]))
        ref = xc[:, sl] @ (q @ torch.diag(lam.rsqrt()) @ q.T)
        torch.testing.assert_close(y[:, sl], ref)


def test_dbn_and_shuffled_dbn_gradcheck():
    x = _x(10, 5).requires_grad_()
    dbn = DBN(5, group_size=3, eps=1e-3).double()
    assert torch.autograd.gradcheck(lambda t: dbn(t), (x,))
    sdbn = ShuffledDBN(5, group_size=2, eps=1e-3, seed=1).double()
    assert torch.autograd.gradcheck(lambda t: sdbn(t, 7), (x,))
    ns = DBN(5, group_size=3, eps=1e-3, method="newton_schulz", ns_iters=3).double()
    assert torch.autograd.gradcheck(lambda t: ns(t), (x,))


def test_shuffled_dbn_is_permuted_dbn_and_depends_on_seed_and_step():
    x = _x(40, 8)
    sdbn = ShuffledDBN(8, group_size=4, eps=0.0, seed=5).double()
    perm = permutation_for_step(8, 5, 11)
    assert torch.equal(perm, permutation_for_step(8, 5, 11))
    assert not torch.equal(perm, permutation_for_step(8, 5, 12))
    assert not torch.equal(perm, permutation_for_step(8, 6, 11))
    ref = DBN(8, group_size=4, eps=0.0).double()(x[:, perm])[:, torch.argsort(perm)]
    torch.testing.assert_close(sdbn(x, 11), ref)
    assert not torch.allclose(sdbn(x, 12), ref)


def test_dbn_group_size_zero_is_half_the_batch_and_survives_state_dict():
    dbn = DBN(16, group_size=0).double()
    assert int(dbn.group_size) == 0
    dbn(_x(12, 16))
    assert int(dbn.group_size) == 6  # global batch 12 / 2
    assert dbn.running_cov.shape == (2, 6, 6) and dbn.running_cov_tail.shape == (4, 4)
    fresh = DBN(16, group_size=0).double()
    fresh.load_state_dict(dbn.state_dict())
    assert int(fresh.group_size) == 6
    fresh.eval()
    dbn.eval()
    x = _x(5, 16, seed=3)
    torch.testing.assert_close(fresh(x), dbn(x))
    with pytest.raises(ValueError, match="group size 6 differs"):
        DBN(16, group_size=4).load_state_dict(dbn.state_dict())


def test_dbn_eval_uses_running_statistics():
    dbn = DBN(4, group_size=4, eps=0.0, momentum=1.0).double()
    x = _x(200, 4)
    dbn(x)
    dbn.eval()
    y = dbn(x)  # momentum 1: running stats = this batch's (unbiased) stats
    n = x.shape[0]
    torch.testing.assert_close(_cov(y), torch.eye(4, dtype=torch.float64) * (n - 1) / n, rtol=0, atol=1e-8)
    with pytest.raises(RuntimeError, match="no running statistics"):
        DBN(4).eval()(x)


def test_dbn_rank_bound_is_a_clear_error():
    dbn = DBN(16, group_size=8).double()
    with pytest.raises(ValueError, match=r"G=8 needs a global batch of at least G\+1=9.*got 8"):
        dbn(_x(8, 16))
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        DBN(4, group_size=-1)


def test_dbn_autocast_runs_in_fp32():
    dbn = DBN(8, group_size=4)
    x = _x(32, 8).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dbn(x.bfloat16())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_dbn_whitens_an_ill_conditioned_fp32_batch_without_amplifying_round_off():
    """A trained projector's fp32 output can span 12 orders of magnitude of variance. Whitened from an fp32
    covariance with an absolute floor, the round-off eigenvalues (negative here) come out with std ~180
    (the 000-table1 DBN divergence); DBN whitens in float64 with a round-off floor, so std stays ≤ 1."""
    torch.manual_seed(0)
    n, d = 128, 64
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    x = ((torch.randn(n, d, dtype=torch.float64) * torch.logspace(0, -6, d, dtype=torch.float64)) @ q.T * 100 + 3)
    x = x.float()
    xc = x - x.mean(0)
    lam, vec = torch.linalg.eigh(xc.T @ xc / n)  # the fp32 route, for contrast
    naive = xc @ ((vec / lam.clamp_min(1e-9).sqrt()) @ vec.T)
    assert lam.min() < 0 and naive.std(0).max() > 10
    y = DBN(d, group_size=d, eps=1e-9)(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    std = y.std(0)
    assert std.max() <= 1.01 and std.mean() > 0.99, (std.max(), std.mean())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_global_bn_cpu_path_matches_batchnorm2d(momentum, channels_last):
    """The all-reduce path (run here at world size 1, where the collectives are the identity) is BatchNorm2d."""
    from largessl.nn import GlobalBatchNorm, convert_to_global_bn

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = convert_to_global_bn(nn.Sequential(copy.deepcopy(ref)))[0]
    assert isinstance(ours, GlobalBatchNorm) and ours.state_dict().keys() == ref.state_dict().keys()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(6, 5, 4, 3) * (step + 1) + step).contiguous(memory_format=fmt).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        ours.num_batches_tracked.add_(1)
        y = ours._cpu_forward(x, factor)
        y_ref = ref(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        (y_ref * torch.arange(y_ref.numel()).view_as(y_ref)).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)


def test_global_bn_keeps_low_precision_dtype_and_fp32_statistics():
    from largessl.nn import GlobalBatchNorm

    bn = GlobalBatchNorm(4)
    x = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    y = bn._cpu_forward(x, 0.1)
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    ref = nn.functional.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_global_bn_eval_mode_uses_running_statistics():
    from largessl.nn import GlobalBatchNorm

    bn = GlobalBatchNorm(3)
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
        bn.running_var.fill_(4.0)
    bn.eval()
    x = torch.full((2, 3, 2, 2), 4.0)
    torch.testing.assert_close(bn(x), torch.full_like(x, 1.0), rtol=1e-4, atol=1e-4)
