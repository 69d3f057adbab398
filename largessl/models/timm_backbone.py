"""timm backbones by name: ``model.arch=timm/<name>`` builds ``timm.create_model(<name>)`` as a feature extractor.

Nothing is downloaded: ``pretrained=False`` always (weights come from largessl's own checkpoints), and the
classifier is removed with ``num_classes=0`` so ``forward`` returns timm's pooled features (the class token
for ViTs, global average for ConvNeXt). The module *is* the timm model, so its ``state_dict`` keys are timm's
and an export loads into ``timm.create_model(<name>, num_classes=0, pretrained=False, **same kwargs)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

PREFIX = "timm/"
"""``model.arch`` prefix selecting a timm model."""


def is_timm_arch(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``timm/<name>``)."""
    return arch.startswith(PREFIX)


def timm_name(arch: str) -> str:
    """``timm/vit_small_patch16_224`` → ``vit_small_patch16_224``."""
    return arch[len(PREFIX):]


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:  # a runtime dependency; only a broken install lacks it
        raise RuntimeError("model.arch=timm/... needs the timm package (a largessl dependency): "
                           "pip install -c constraints.txt timm") from e
    return timm


def timm_kwargs(image_size: int, drop_path_rate: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments asked of ``timm.create_model``; :func:`build_timm` keeps ``img_size`` only where taken."""
    kwargs: dict[str, Any] = {"num_classes": 0, **extra}
    if image_size > 0:
        kwargs.setdefault("img_size", image_size)
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    return kwargs


def build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``; an unknown name raises listing close matches.

    The model's ``timm_kwargs`` attribute records the arguments it was built with (``img_size`` dropped for
    models without one), which is what loading an export into timm needs.
    """
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:12]
        raise ValueError(f"model.arch=timm/{name}: timm has no model {name!r}"
                         + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"))
    try:
        try:
            net = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            # ConvNeXt, ResNet, ... have no img_size (their input size is free): build without it
            if "img_size" not in str(e) or "img_size" not in kwargs:
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            net = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ValueError(f"model.arch=timm/{name}: timm rejected the arguments {kwargs} ({e}); "
                         "fix model.timm_kwargs / model.drop_path_rate") from None
    if getattr(net, "num_features", 0) <= 0:
        raise ValueError(f"timm model {name} reports no num_features; it cannot serve as a backbone")
    net.timm_kwargs = dict(kwargs)
    return net


def prefers_channels_last(net: nn.Module) -> bool:
    """Whether NHWC pays off: for convolution stacks (ResNet, ConvNeXt); a ViT has one patch-embedding conv, then
    only matmuls."""
    return not hasattr(net, "patch_embed")


def vit_layer_index(name: str, num_blocks: int) -> int:
    """Depth of a ViT parameter for layer-wise lr decay: 0 for the embeddings (patch, position, tokens), i + 1 for
    ``blocks.i``, ``num_blocks + 1`` for what follows the blocks (final norm, pooling)."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.split(".")[0] in ("patch_embed", "pos_embed", "cls_token", "reg_token", "dist_token", "pos_drop",
                              "norm_pre"):
        return 0
    return num_blocks + 1


def layer_decay_groups(net: nn.Module, lr: float, decay: float) -> list[dict[str, Any]]:
    """Parameter groups of a ViT with lr × decay^(depth from the top) (BEiT/MAE fine-tuning), embeddings lowest.

    Raises ValueError for a backbone without a ``blocks`` sequence (layer decay is defined for ViTs).
    """
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"layer-wise lr decay needs a ViT-style backbone with a 'blocks' sequence; "
                         f"{type(net).__name__} has none: set eval.finetune.layer_decay=1.0")
    top = len(blocks) + 1
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        groups.setdefault(vit_layer_index(name, len(blocks)), []).append(p)
    return [{"params": params, "lr": lr * decay ** (top - depth), "layer": depth}
            for depth, params in sorted(groups.items())]
