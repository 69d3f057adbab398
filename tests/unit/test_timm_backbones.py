"""``model.arch=timm/<name>``: the build (features, img_size, drop-path, global BN), the optimizer groups that keep
position embeddings and tokens out of weight decay and LARS, layer-wise lr decay, and that ResNets are unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from largessl.config import load_config
from largessl.eval.config import FinetuneConfig
from largessl.methods import build_method
from largessl.models import ModelConfig, build_backbone, prefers_channels_last
from largessl.models.timm_backbone import layer_decay_groups
from largessl.nn.batchnorm import GlobalBatchNorm
from largessl.run.precision import resolve_precision
from largessl.train.optim import build_optimizer, param_groups

timm = pytest.importorskip("timm", reason="timm is a largessl dependency: pip install -c constraints.txt timm")

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def _vit(**kw) -> nn.Module:
    return build_backbone(ModelConfig(arch="timm/vit_tiny_patch16_224", image_size=16, timm_kwargs=TINY, **kw))


def test_vit_is_a_feature_extractor_at_the_configured_size():
    net = _vit()
    assert net.num_features == 32 and net.num_classes == 0
    assert net.patch_embed.grid_size == (2, 2) and net.pos_embed.shape == (1, 5, 32)  # 4 patches + class token
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, 32)
    assert net.timm_kwargs == {"num_classes": 0, **TINY, "img_size": 16}
    assert not prefers_channels_last(net)


def test_convnet_without_img_size_builds_and_has_no_bn_to_convert():
    net = build_backbone(ModelConfig(arch="timm/convnext_atto", image_size=32, sync_bn=True, drop_path_rate=0.1))
    assert "img_size" not in net.timm_kwargs and net.timm_kwargs["drop_path_rate"] == 0.1
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.num_features) and prefers_channels_last(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # LayerNorm only


def test_timm_batchnorm_becomes_global_bn_and_fused_bn_is_refused():
    net = build_backbone(ModelConfig(arch="timm/resnet10t", sync_bn=True))
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, GlobalBatchNorm) for m in bns)
    with pytest.raises(ValueError, match="BatchNormAct2d.*sync_bn=false"):
        build_backbone(ModelConfig(arch="timm/efficientnet_b0", sync_bn=True))


@pytest.mark.parametrize("override, match", [
    (["model.arch=timm/vit_nonexistent_9"], "timm has no model 'vit_nonexistent_9'"),
    (["model.arch=timm/convnext_atto", "model.small_input=true"], "small_input=true applies to torchvision"),
    (["model.arch=resnet18", "model.drop_path_rate=0.1"], "apply to timm models"),
    (["model.arch=timm/vit_tiny_patch16_224", "model.timm_kwargs={img_size: 64}"], "may not set"),
    (["model.arch=timm/vit_tiny_patch16_224", "model.timm_kwargs={no_such_arg: 1}"], "timm rejected"),
])
def test_bad_timm_settings_are_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(load_config(None, override).model)


def test_model_image_size_is_resolved_from_data_for_timm_only():
    cfg = load_config(None, ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=48"])
    assert cfg.model.image_size == 48
    assert load_config(None, ["model.arch=resnet18", "data.image_size=48"]).model.image_size == 0
    with pytest.raises(ValueError, match="model.image_size=64 but data.image_size=48"):
        load_config(None, ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=48", "model.image_size=64"])


def test_resnet_default_is_bitwise_torchvision():
    torch.manual_seed(0)
    ours = build_backbone(ModelConfig(arch="resnet18", zero_init_residual=True))
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    ref.fc = nn.Identity()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


def test_vit_tokens_and_position_embedding_skip_weight_decay_and_lars():
    cfg = load_config(None, ["model.arch=timm/vit_tiny_patch16_224", "method.projector=16-16", "optim.name=lars",
                             "optim.weight_decay=0.05"])
    model = build_method(cfg.method, _vit())
    groups = {g["name"]: g for g in param_groups(model, cfg.optim, 0.1, 0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for p in groups["bias_norm"]["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= free
    assert groups["bias_norm"]["weight_decay"] == 0.0 and not groups["bias_norm"]["lars_adapt"]
    decayed = {names[id(p)] for p in groups["weights"]["params"]}
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and not decayed & free
    assert all(p.ndim > 1 for p in groups["weights"]["params"])


def test_resnet_groups_are_the_ndim_rule():
    cfg = load_config(None, ["model.arch=resnet18", "method.projector=16-16"])
    model = build_method(cfg.method, build_backbone(cfg.model))
    groups = {g["name"]: g for g in param_groups(model, cfg.optim, 0.1, 0.01)}
    assert [p.ndim <= 1 for p in groups["bias_norm"]["params"]] == [True] * len(groups["bias_norm"]["params"])
    assert len(groups["weights"]["params"]) + len(groups["bias_norm"]["params"]) == len(list(model.parameters()))


def test_layer_decay_groups_scale_lr_by_depth():
    net = _vit()
    groups = layer_decay_groups(net, lr=1.0, decay=0.5)
    assert [g["layer"] for g in groups] == [0, 1, 2, 3, 4]
    assert [g["lr"] for g in groups] == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5, 1.0]
    by_layer = {g["layer"]: {id(p) for p in g["params"]} for g in groups}
    assert id(net.pos_embed) in by_layer[0] and id(net.cls_token) in by_layer[0]
    assert id(net.blocks[2].mlp.fc1.weight) in by_layer[3] and id(net.norm.weight) in by_layer[4]
    assert sum(len(v) for v in by_layer.values()) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="blocks"):
        layer_decay_groups(build_backbone(ModelConfig(arch="resnet18")), 1.0, 0.5)
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneConfig(layer_decay=0.0).validate()


@pytest.mark.parametrize("arch, kwargs, size", [
    ("timm/vit_tiny_patch16_224", TINY, 16),
    ("timm/convnext_atto", {}, 32),
])
@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_forward_backward_bf16_autocast_and_adamw(arch, kwargs, size, method):
    cfg = load_config(None, [f"model.arch={arch}", f"data.image_size={size}", f"method.name={method}",
                             "method.projector=32-32", "optim.name=adamw", "train.device=cpu",
                             "train.precision=bf16", "train.channels_last=true"])
    cfg.model.timm_kwargs = dict(kwargs)
    policy = resolve_precision(cfg.train, torch.device("cpu"))
    model = build_method(cfg.method, build_backbone(cfg.model))
    fmt = torch.channels_last if prefers_channels_last(model.backbone) else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = build_optimizer(model, cfg.optim, 1e-3, 1e-3)
    views = [torch.randn(8, 3, size, size).to(memory_format=fmt) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=policy.dtype):
        out = model(views, step=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None)


TIMM_RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*_in1k.yaml")
                      if "vit" in p.stem or "convnext" in p.stem)


def test_every_backbone_recipe_exists():
    assert {p.stem for p in TIMM_RECIPES} == {f"{m}_{b}_in1k" for m in ("barlow_twins", "vicreg")
                                              for b in ("vit_s16", "vit_b16", "convnext_t")}


@pytest.mark.parametrize("path", TIMM_RECIPES, ids=[p.stem for p in TIMM_RECIPES])
def test_backbone_recipe_builds_and_names_its_source(path):
    text = path.read_text()
    assert re.search(r"DINO|MoCo v3|VICRegL", text) and "base: " in text
    # every recipe value of the file carries a comment saying where it comes from
    values = [line for line in text.splitlines() if re.match(r"^  \w+: ", line)]
    assert values and all("#" in line for line in values if "arch:" not in line), path.name
    cfg = load_config(path)
    assert cfg.optim.name == "adamw" and cfg.model.image_size == 224
    expected = {"vit_small_patch16_224": 384, "vit_base_patch16_224": 768, "convnext_tiny": 768}
    with torch.device("meta"):  # shapes only: no 86M-parameter init on a CI core
        net = build_backbone(cfg.model)
    assert net.num_features == expected[cfg.model.arch.split("/")[1]]
