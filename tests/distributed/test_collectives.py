"""Autograd-correct collectives on real gloo process groups, and the bootstrap from torchrun variables."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_harness import run_distributed

from largessl.distributed import collectives as C
from largessl.distributed.env import detect_env, free_port, init_distributed, shutdown_distributed

DT = torch.float64


def _rows(rank: int) -> torch.Tensor:
    """Rank r's (2, 3) block of a global (2W, 3) matrix."""
    return torch.arange(6, dtype=DT).reshape(2, 3) + 10 * rank


def _collectives(rank: int, world: int) -> dict:
    out = {}
    # all_reduce_sum: value, and the backward sums gradients over ranks (W × the local share).
    x = _rows(rank).requires_grad_()
    s = C.all_reduce_sum(x)
    (s * (rank + 1)).sum().backward()  # a rank-dependent loss makes the gradient sum visible
    out["sum"], out["sum_grad"] = s.detach().numpy(), x.grad.numpy()
    # all_gather_with_grad: rank order, and the gradient of a global loss reaches every rank's rows.
    x = _rows(rank).requires_grad_()
    g = C.all_gather_with_grad(x)
    (g.pow(2).sum()).backward()
    out["gather"], out["gather_grad"] = g.detach().numpy(), x.grad.numpy()
    # global_gram: both collectives give the full aᵀb and the same gradients.
    for how in ("all_gather", "all_reduce"):
        a = _rows(rank).requires_grad_()
        b = (_rows(rank) ** 2 / 7).requires_grad_()
        gram = C.global_gram(a, b, collective=how)
        gram.pow(2).sum().backward()
        out[f"gram_{how}"], out[f"gram_{how}_grads"] = gram.detach().numpy(), (a.grad.numpy(), b.grad.numpy())
    out["gather_no_grad"] = C.all_gather_no_grad(_rows(rank).requires_grad_()).numpy()
    out["sum_no_grad"] = C.all_reduce_sum_no_grad(_rows(rank).clone()).numpy()
    out["count"] = C.global_count(rank + 1, torch.device("cpu"))
    out["broadcast"] = C.broadcast_object({"decision": rank * 10}, src=0)
    # An explicit subgroup: ranks 0 and 2 only; rank 1 is not a member.
    sub = dist.new_group([0, 2])
    if rank != 1:
        out["sub_sum"] = C.all_reduce_sum(torch.tensor([float(rank + 1)], dtype=DT), group=sub).numpy()
        out["sub_world"] = C.get_world_size(sub)
    C.barrier()
    return out


def test_collectives_on_three_gloo_ranks():
    world = 3
    res = run_distributed(_collectives, world)
    full = torch.cat([_rows(r) for r in range(world)]).numpy()
    total = sum(_rows(r) for r in range(world)).numpy()
    for rank, out in enumerate(res):
        assert (out["sum"] == total).all()
        assert (out["sum_grad"] == 1 + 2 + 3).all()  # Σ_r (r + 1): gradients summed across ranks
        assert (out["gather"] == full).all()
        # d/dx Σ g² = 2x from each rank's identical loss, reduce-scattered: W · 2x.
        assert torch.allclose(torch.as_tensor(out["gather_grad"]), world * 2 * _rows(rank))
        assert (out["gather_no_grad"] == full).all() and (out["sum_no_grad"] == total).all()
        assert out["count"] == 1 + 2 + 3 and out["broadcast"] == {"decision": 0}
        if rank != 1:
            assert out["sub_sum"][0] == 1 + 3 and out["sub_world"] == 2
    # Both gram collectives equal the single-process aᵀb, and their gradients agree with each other.
    a_full = torch.cat([_rows(r) for r in range(world)])
    b_full = a_full**2 / 7
    for rank, out in enumerate(res):
        for how in ("all_gather", "all_reduce"):
            assert torch.allclose(torch.as_tensor(out[f"gram_{how}"]), a_full.T @ b_full)
        ga, gb = out["gram_all_gather_grads"]
        ra, rb = out["gram_all_reduce_grads"]
        assert torch.allclose(torch.as_tensor(ga), torch.as_tensor(ra))
        assert torch.allclose(torch.as_tensor(gb), torch.as_tensor(rb))
        # The true gradient of ||aᵀb||² w.r.t. rank r's rows of a is 2 b_r (aᵀb)ᵀ; each rank holds W ×.
        gram = a_full.T @ b_full
        true_a = 2 * (b_full @ gram.T)[2 * rank: 2 * rank + 2]
        assert torch.allclose(torch.as_tensor(ga), world * true_a)


def test_identity_without_a_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert C.all_reduce_sum(x) is x and C.all_gather_with_grad(x) is x
    assert torch.equal(C.global_gram(x), x.T @ x)
    assert C.get_world_size() == 1 and C.get_rank() == 0 and C.global_count(5, x.device) == 5
    assert C.broadcast_object("same") == "same"
    with pytest.raises(ValueError, match="all_gather or all_reduce"):
        C.global_gram(x, collective="avg")


def _bootstrap(rank: int, port: int, queue) -> None:
    environ = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        env = detect_env(environ)
        init_distributed(env, backend="gloo", timeout_minutes=1)
        t = C.all_reduce_sum(torch.tensor([float(rank + 1)]))
        queue.put((rank, env.source, float(t)))
    except BaseException as e:  # report, never hang the parent
        queue.put((rank, "error", repr(e)))
    finally:
        shutdown_distributed()


def test_bootstrap_from_torchrun_variables():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_bootstrap, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == [(0, "torchrun", 3.0), (1, "torchrun", 3.0)], got
