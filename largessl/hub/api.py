"""Python API for downstream code: a verified backbone from a hub name or a pulled folder, and its preprocessing.

    from largessl.hub import load_backbone
    net = load_backbone("bt-r50-in1k@v1", hub="s3://models/hub")   # fc = Identity, eval mode
    net, transform = load_backbone("bt-r50-in1k@v1", hub="s3://models/hub", with_transform=True)
    features = net(transform(pil_image).unsqueeze(0))
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from largessl.hub.weights import backbone_from_card, read_backbone


class EvalTransform:
    """PIL image → normalised CHW float tensor, exactly as largessl's kNN/linear evaluation saw the model's
    inputs: resize + center crop to ``image_size`` (whole image up to 64 px, 87.5% center above, ImageNet's
    224/256), ImageNet mean and std."""

    def __init__(self, image_size: int) -> None:
        from largessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

        self.image_size = int(image_size)
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        self._view = build_eval_transform("eval", self.image_size)

    def __call__(self, img: Any) -> torch.Tensor:
        return self._view(img.convert("RGB"))[0]

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def load_backbone(ref: str | os.PathLike[str], hub: str | None = None, endpoint_url: str = "",
                  with_card: bool = False, allow_yanked: bool = True, with_transform: bool = False) -> Any:
    """A torchvision ResNet (fc=Identity, ``num_features`` set, eval mode) with verified hub weights.

    ``ref`` is ``NAME[@VERSION]`` in ``hub`` (default: $LARGESSL_HUB, else ``hub``) or a folder written by
    ``largessl hub pull``. Every byte loaded is checked against the recorded sha256 first. With
    ``with_card`` the model card is returned too, with ``with_transform`` the matching :class:`EvalTransform`:
    ``net``, ``(net, card)``, ``(net, transform)`` or ``(net, card, transform)``. ``NAME``/``NAME@latest`` never
    resolves to a yanked version; code pinned to a yanked ``NAME@VERSION`` keeps loading it with a logged
    warning (``allow_yanked=False`` refuses it instead, as ``hub pull`` and ``hub export`` do).
    """
    card, data = read_backbone(ref, hub, endpoint_url, allow_yanked)
    net: nn.Module = backbone_from_card(card, data)
    out: list[Any] = [net]
    if with_card:
        out.append(card)
    if with_transform:
        size = (card.get("config", {}).get("data", {}) or {}).get("image_size")
        if not isinstance(size, int):
            raise ValueError(f"the card of {ref} records no data.image_size; build the transform by hand")
        out.append(EvalTransform(size))
    return out[0] if len(out) == 1 else tuple(out)
