"""World-size invariance: W gloo ranks × per-rank batch B ≡ 1 process × W·B, for loss and gradients.

Every method (each decorrelation head, each SimSiam variant, both multiview regularisers, both BT/VICReg
collectives) runs wrapped in real torch DDP in float64; the loss and every parameter gradient after
DDP's averaging must equal the single-process run on the concatenated batch at rtol 1e-6. The layers
(GlobalBatchNorm1d, DBN, Shuffled-DBN) are checked directly: outputs, input and parameter gradients.
One ``run_distributed`` call per world size loops over all cases (spawning is the expensive part).
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from largessl.distributed.collectives import all_reduce_sum, get_rank, get_world_size
from largessl.methods import METHODS, build_method
from largessl.nn import DBN, GlobalBatchNorm1d, ShuffledDBN

DT = torch.float64
GLOBAL_BATCH = 16  # 2 ranks × 8 and 4 ranks × 4
IN_DIM = 6
STEP = 3

METHOD_CASES: list[tuple[str, str, dict]] = [
    ("bt_gather", "barlow_twins", {"projector": "16-12", "collective": "all_gather"}),
    ("bt_reduce", "barlow_twins", {"projector": "16-12", "collective": "all_reduce"}),
    ("vicreg_gather", "vicreg", {"projector": "16-12", "collective": "all_gather"}),
    ("vicreg_reduce", "vicreg", {"projector": "16-12", "collective": "all_reduce"}),
    ("bt_diag_only", "barlow_twins", {"projector": "16-12", "lambd": 0.0, "on_diag_weight": 2.0}),  # no C, diag only
    ("vicreg_ref_std_no_cov", "vicreg", {"projector": "16-12", "std_term": "reference", "cov_coeff": 0.0}),
    ("decor_none", "decorrelation", {"head": "none", "projector": "16-12"}),
    ("decor_bn", "decorrelation", {"head": "bn", "projector": "16-12"}),
    ("decor_bn_affine_eps", "decorrelation", {"head": "bn", "bn_affine": True, "bn_eps": 0.1, "projector": "16-12"}),
    ("decor_dbn", "decorrelation", {"head": "dbn", "projector": "16-12", "loss": "cosine"}),  # G = 8: 8 + 4 tail
    ("decor_shuffled_dbn", "decorrelation", {"head": "shuffled_dbn", "projector": "16-12", "seed": 7}),
    ("decor_shuffled_ns", "decorrelation", {"head": "shuffled_dbn", "group_size": 4, "whitening": "newton_schulz"}),
    ("simsiam", "simsiam", {"projector": "16-12", "predictor_hidden": 4}),
    ("simsiam_mirror", "simsiam", {"projector": "16-12", "predictor_hidden": 4, "variant": "mirror"}),
    ("simsiam_naive", "simsiam", {"projector": "16-12", "variant": "naive"}),
    ("simsiam_symmetric", "simsiam", {"projector": "16-12", "predictor_hidden": 4, "variant": "symmetric"}),
    ("simsiam_fcfcbias", "simsiam", {"projector": "16-12", "predictor_hidden": 4, "predictor": "fc_fc_bias"}),
    ("simsiam_tanh", "simsiam", {"projector": "16-12", "predictor": "tanh_fc"}),
    ("simsiam_bias", "simsiam", {"projector": "16-12", "predictor": "bias"}),
    ("multiview_bt", "multiview", {"projector": "16-12", "num_views": 3, "collective": "all_gather"}),
    ("multiview_vicreg", "multiview", {"projector": "16-12", "num_views": 3, "regularizer": "vicreg",
                                       "collective": "all_reduce"}),
    ("multiview_bt_no_inv", "multiview", {"projector": "16-12", "num_views": 3, "on_diag_weight": 0.0}),
]
LAYER_CASES = ["bn", "bn_eps0", "dbn", "dbn_tail", "shuffled_dbn"]


class TinyBackbone(nn.Module):
    """A deterministic Linear 'backbone' with num_features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_DIM, 8)
        self.num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _method(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return build_method(METHODS.extra(name, "config")(**kwargs), TinyBackbone()).to(DT)


def _views(m: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=DT) for _ in range(m)]


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind.startswith("bn"):
        layer = GlobalBatchNorm1d(10, eps=0.0 if kind == "bn_eps0" else 1e-5, affine=kind == "bn")
        if kind == "bn":
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
    elif kind == "dbn":
        layer = DBN(10, group_size=5, eps=0.0)
    elif kind == "dbn_tail":
        layer = DBN(10, group_size=0)  # G = 16/2 = 8: one group of 8 and a tail of 2
    else:
        layer = ShuffledDBN(10, group_size=4, eps=1e-6, seed=11)
    return layer.to(DT)


def _layer_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=DT) @ torch.randn(10, 10, generator=g, dtype=DT)
    w = torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=DT)  # fixed weights of a linear readout loss
    return x, w


def _run_layer(kind: str, rows: slice) -> dict:
    layer = _layer(kind)
    x_full, w_full = _layer_data()
    x = x_full[rows].clone().requires_grad_()
    y = layer(x, STEP) if isinstance(layer, ShuffledDBN) else layer(x)
    # A global loss: Σ over the global batch of <y, w>, squared so the gradient depends on every sample.
    loss = all_reduce_sum((y * w_full[rows]).sum()) ** 2
    loss.backward()
    world = get_world_size()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads = {n: all_reduce_sum(g.clone()) / world for n, g in grads.items()}  # what DDP's averaging does
    # Each rank's input gradient is W × its share of the true one (collectives.py's convention).
    return {"loss": loss.detach(), "y": y.detach(), "x_grad": x.grad / world, "params": grads,
            "running": {n: b.clone() for n, b in layer.named_buffers()}}


def _run_method(name: str, kwargs: dict, rows: slice, distributed: bool) -> dict:
    model = _method(name, kwargs)
    views = [v[rows] for v in _views(kwargs.get("num_views", 2))]
    wrapped = DDP(model) if distributed else model
    out = wrapped(views, step=STEP)
    out.loss.backward()
    return {"loss": out.loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _all_cases(rank: int, world: int) -> dict:
    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {f"method:{case}": _run_method(name, kw, rows, world > 1) for case, name, kw in METHOD_CASES}
    out.update({f"layer:{kind}": _run_layer(kind, rows) for kind in LAYER_CASES})
    out["rank"] = get_rank()
    # numpy pickles by value; a tensor sent through the harness queue refers to this process's shared
    # memory, which is gone once the worker exits.
    return _to_numpy(out) if world > 1 else out


def _to_numpy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="module")
def reference() -> dict:
    return _all_cases(0, 1)


def _close(a, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-6, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_world_size_invariance(world, reference):
    results = run_distributed(_all_cases, world)
    b = GLOBAL_BATCH // world
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        for case, _, _ in METHOD_CASES:
            got, ref = res[f"method:{case}"], reference[f"method:{case}"]
            _close(got["loss"], ref["loss"], f"{case} loss (W={world}, rank {rank})")
            assert got["grads"].keys() == ref["grads"].keys()
            for pname, g in ref["grads"].items():
                _close(got["grads"][pname], g, f"{case} grad {pname} (W={world}, rank {rank})")
        for kind in LAYER_CASES:
            got, ref = res[f"layer:{kind}"], reference[f"layer:{kind}"]
            rows = slice(rank * b, (rank + 1) * b)
            _close(got["loss"], ref["loss"], f"{kind} loss (W={world})")
            _close(got["y"], ref["y"][rows], f"{kind} output (W={world}, rank {rank})")
            _close(got["x_grad"], ref["x_grad"][rows], f"{kind} input grad (W={world}, rank {rank})")
            for pname, g in ref["params"].items():
                _close(got["params"][pname], g, f"{kind} grad {pname} (W={world})")
            for bname, buf in ref["running"].items():
                _close(torch.as_tensor(got["running"][bname]).to(buf.dtype), buf, f"{kind} buffer {bname} (W={world})")


def test_reference_is_not_degenerate(reference):
    """Guards the invariance test against passing vacuously (zero gradients agree with anything)."""
    for case, _, _ in METHOD_CASES:
        grads = reference[f"method:{case}"]["grads"]
        assert any(g.abs().max() > 1e-6 for g in grads.values()), case
        assert torch.isfinite(reference[f"method:{case}"]["loss"])
    for kind in LAYER_CASES:
        assert reference[f"layer:{kind}"]["x_grad"].abs().max() > 1e-6, kind
