"""Python API for downstream code: a verified torchvision ResNet from a hub name or a pulled folder.

    from largessl.hub import load_backbone
    net = load_backbone("bt-r50-in1k@v1", hub="s3://models/hub")   # fc = Identity, eval mode
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from largessl.hub.weights import backbone_from_card, read_backbone


def load_backbone(ref: str | os.PathLike[str], hub: str | None = None, endpoint_url: str = "",
                  with_card: bool = False, allow_yanked: bool = True) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """A torchvision ResNet (fc=Identity, ``num_features`` set, eval mode) with verified hub weights.

    ``ref`` is ``NAME[@VERSION]`` in ``hub`` (default: $LARGESSL_HUB, else ``hub``) or a folder written by
    ``largessl hub pull``. Every byte loaded is checked against the recorded sha256 first. With
    ``with_card`` the model card is returned too. ``NAME``/``NAME@latest`` never resolves to a yanked
    version; code pinned to a yanked ``NAME@VERSION`` keeps loading it with a logged warning
    (``allow_yanked=False`` refuses it instead, as ``hub pull`` and ``hub export`` do).
    """
    card, data = read_backbone(ref, hub, endpoint_url, allow_yanked)
    net = backbone_from_card(card, data)
    return (net, card) if with_card else net
