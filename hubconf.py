"""torch.hub entry points: ``torch.hub.load(repo_dir, "resnet50", checkpoint=..., source="local")``.

``checkpoint`` is a folder written by ``largessl hub pull``, ``NAME[@VERSION]`` in ``hub=URL``, or a
pretraining run directory / step folder. Returns a torchvision ResNet with ``fc = Identity`` (add your
own head) in eval mode; hub weights are sha256-verified before loading. Without ``checkpoint`` the
network is randomly initialised.
"""

from __future__ import annotations

from pathlib import Path

dependencies = ["torch", "torchvision", "safetensors"]


def _build(arch: str, checkpoint: str | None, hub: str | None, small_input: bool):
    from largessl.hub.api import load_backbone
    from largessl.hub.records import CARD
    from largessl.hub.weights import build_backbone_from_config, load_backbone_from_checkpoint

    if checkpoint is None:
        return build_backbone_from_config({"arch": arch, "small_input": small_input})
    path = Path(str(checkpoint))
    if (path / CARD).is_file() or not path.exists():
        net, card = load_backbone(str(checkpoint), hub=hub, with_card=True)
        got = card["architecture"]["arch"]
    else:
        net, config, _ = load_backbone_from_checkpoint(path)
        got = config.get("model", {}).get("arch", "resnet50")
    if got != arch:
        raise ValueError(f"{checkpoint} holds a {got} backbone, not {arch}; use torch.hub.load(..., {got!r}, ...)")
    return net.eval()


def resnet18(checkpoint: str | None = None, hub: str | None = None, small_input: bool = False):
    """ResNet-18 backbone (fc = Identity) with largessl-pretrained weights."""
    return _build("resnet18", checkpoint, hub, small_input)


def resnet34(checkpoint: str | None = None, hub: str | None = None, small_input: bool = False):
    """ResNet-34 backbone (fc = Identity) with largessl-pretrained weights."""
    return _build("resnet34", checkpoint, hub, small_input)


def resnet50(checkpoint: str | None = None, hub: str | None = None, small_input: bool = False):
    """ResNet-50 backbone (fc = Identity) with largessl-pretrained weights."""
    return _build("resnet50", checkpoint, hub, small_input)


def resnet101(checkpoint: str | None = None, hub: str | None = None, small_input: bool = False):
    """ResNet-101 backbone (fc = Identity) with largessl-pretrained weights."""
    return _build("resnet101", checkpoint, hub, small_input)
