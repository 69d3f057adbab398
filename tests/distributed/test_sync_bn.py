"""Global backbone BN (``model.sync_bn=true``) on a real ResNet: W gloo ranks × B ≡ 1 process × W·B.

A torchvision ResNet-18 (CIFAR stem, 8×8 inputs, float64) with every BatchNorm2d converted by
``build_backbone`` runs Barlow Twins and VICReg under real DDP. After one forward/backward the loss, every
parameter gradient (after DDP's averaging) and every BN running statistic must equal the single-process
run on the concatenated batch. The counter-test shows that with ``sync_bn=false`` the same comparison
fails, so the invariance test is known to bite: per-rank BN normalises each rank's 4-8 samples alone.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from largessl.distributed.collectives import get_rank
from largessl.methods import METHODS, build_method
from largessl.models import ModelConfig, build_backbone
from largessl.nn import GlobalBatchNorm

DT = torch.float64
GLOBAL_BATCH = 16  # 2 ranks × 8 and 4 ranks × 4
SIZE = 8
CASES = [("barlow_twins", {"projector": "64-32"}), ("vicreg", {"projector": "64-32"})]
RTOL, ATOL = 1e-6, 1e-9


def _model(method: str, kwargs: dict, sync_bn: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    # zero_init_residual=False: every residual branch carries gradient, so every BN layer is tested
    backbone = build_backbone(ModelConfig(arch="resnet18", small_input=True, sync_bn=sync_bn,
                                          zero_init_residual=False))
    return build_method(METHODS.extra(method, "config")(**kwargs), backbone).to(DT)


def _views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=DT) for _ in range(2)]


def _run(rank: int, world: int, per_rank_bn_too: bool) -> dict:
    """Every case with sync_bn=true, and Barlow Twins with sync_bn=false under the key ``per_rank``."""
    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    out: dict = {"rank": get_rank()}
    runs = [(m, kw, True, m) for m, kw in CASES]
    if per_rank_bn_too:
        runs.append((*CASES[0], False, "per_rank"))
    for method, kwargs, sync_bn, key in runs:
        model = _model(method, kwargs, sync_bn)
        n_global_bn = sum(isinstance(m, GlobalBatchNorm) for m in model.backbone.modules())
        wrapped = DDP(model) if world > 1 else model
        res = wrapped([v[rows] for v in _views()], step=0)
        res.loss.backward()
        out[key] = {
            "loss": res.loss.detach().numpy(),
            "grads": {n: p.grad.numpy().copy() for n, p in model.named_parameters()},
            "running": {n: b.numpy().copy() for n, b in model.backbone.named_buffers()},
            "global_bn_layers": n_global_bn,
        }
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return _run(0, 1, False)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(_run, 2, True)


def _mismatches(got: dict, ref: dict) -> list[str]:
    bad = []
    pairs = [("loss", got["loss"], ref["loss"])]
    pairs += [(f"grad {k}", got["grads"][k], v) for k, v in ref["grads"].items()]
    pairs += [(f"buffer {k}", got["running"][k], v) for k, v in ref["running"].items()]
    for what, a, b in pairs:
        a, b = torch.as_tensor(a).to(DT), torch.as_tensor(b).to(DT)
        if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            bad.append(f"{what}: max abs diff {(a - b).abs().max().item():.3g}")
    return bad


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks: 21 s, CI only (make test-slow)
def test_sync_bn_resnet_is_world_size_invariant(world, reference, two_ranks):
    results = two_ranks if world == 2 else run_distributed(_run, world, False)
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        for method, _ in CASES:
            assert res[method]["global_bn_layers"] == 20  # resnet18: 1 stem + 16 block + 3 downsample BNs
            bad = _mismatches(res[method], reference[method])
            assert not bad, f"{method}, W={world}, rank {rank}: " + "; ".join(bad[:8])


def test_per_rank_bn_breaks_invariance(reference, two_ranks):
    """The counter-test: without sync_bn the W=2 run differs from the 1-process run (the test above bites)."""
    method = CASES[0][0]
    assert two_ranks[0]["per_rank"]["global_bn_layers"] == 0
    bad = _mismatches(two_ranks[0]["per_rank"], reference[method])
    assert any(b.startswith("loss") for b in bad), f"{method}: per-rank BN unexpectedly matched the global loss"
    assert any(b.startswith("buffer") and "running_var" in b for b in bad), method
    assert sum(b.startswith("grad") for b in bad) > 10, method


def test_reference_is_not_degenerate(reference):
    for method, _ in CASES:
        grads = reference[method]["grads"]
        bn_weight_grads = [torch.as_tensor(g) for k, g in grads.items() if k.startswith("backbone") and "bn" in k]
        assert bn_weight_grads and all(g.abs().max() > 0 for g in bn_weight_grads), method
        assert reference[method]["running"]["bn1.num_batches_tracked"] == 2  # two views: two BN calls
