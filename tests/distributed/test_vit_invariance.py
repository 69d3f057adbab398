"""World-size invariance for a timm ViT backbone: 2 gloo ranks × per-rank batch B ≡ 1 process × 2B.

A small ``timm/vit_tiny_patch16_224`` (2 blocks of width 32, 8-px patches on 16-px images) under Barlow Twins and
VICReg, wrapped in real torch DDP in float64: the loss and every parameter gradient after DDP's averaging (patch
embedding, position embedding, class token, attention, LayerNorms, projector) must equal the single-process run on
the concatenated batch. LayerNorm normalises per sample, so unlike a ResNet no global BN is involved: what is
checked is that the batch statistics of the losses (gathered or all-reduced) make the ViT's gradients exact.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from largessl.distributed.collectives import get_rank
from largessl.methods import METHODS, build_method
from largessl.models import ModelConfig, build_backbone

pytest.importorskip("timm", reason="timm is a largessl dependency: pip install -c constraints.txt timm")

DT = torch.float64
GLOBAL_BATCH = 8  # 2 ranks × 4
SIZE = 16
VIT = ModelConfig(arch="timm/vit_tiny_patch16_224", image_size=SIZE,
                  timm_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
CASES = [("bt_gather", "barlow_twins", {"projector": "24-16", "collective": "all_gather"}),
         ("bt_reduce", "barlow_twins", {"projector": "24-16", "collective": "all_reduce"}),
         ("vicreg_gather", "vicreg", {"projector": "24-16", "collective": "all_gather"})]


def _run(name: str, kwargs: dict, rows: slice, distributed: bool) -> dict:
    torch.manual_seed(0)
    model = build_method(METHODS.extra(name, "config")(**kwargs), build_backbone(VIT)).to(DT)
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=DT)[rows] for _ in range(2)]
    wrapped = DDP(model) if distributed else model
    out = wrapped(views, step=1)
    out.loss.backward()
    return {"loss": out.loss.detach().numpy(),
            "grads": {n: p.grad.clone().numpy() for n, p in model.named_parameters()}}


def _all(rank: int, world: int) -> dict:
    b = GLOBAL_BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {case: _run(name, kw, rows, world > 1) for case, name, kw in CASES}
    out["rank"] = get_rank()
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return _all(0, 1)


def test_vit_world_size_invariance_2_ranks(reference):
    results = run_distributed(_all, 2)
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        for case, _, _ in CASES:
            got, ref = res[case], reference[case]
            torch.testing.assert_close(torch.as_tensor(got["loss"]), torch.as_tensor(ref["loss"]), rtol=1e-6,
                                       atol=1e-9, msg=lambda m, c=case, r=rank: f"{c} loss (rank {r}): {m}")
            assert got["grads"].keys() == ref["grads"].keys()
            for pname, g in ref["grads"].items():
                torch.testing.assert_close(torch.as_tensor(got["grads"][pname]), torch.as_tensor(g), rtol=1e-6,
                                           atol=1e-9, msg=lambda m, c=case, p=pname, r=rank: f"{c} grad {p} (rank {r}): {m}")


def test_vit_reference_is_not_degenerate(reference):
    """Every ViT parameter (tokens and position embedding included) gets a non-zero gradient."""
    for case, _, _ in CASES:
        grads = reference[case]["grads"]
        for key in ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
                    "backbone.blocks.1.attn.qkv.weight", "backbone.norm.weight"):
            assert abs(grads[key]).max() > 1e-8, f"{case}: {key} has no gradient"
