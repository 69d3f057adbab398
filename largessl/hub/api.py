"""Python API for downstream code: a verified torchvision ResNet from a hub name or a pulled folder.

    from largessl.hub import load_backbone
    net = load_backbone("bt-r50-in1k@v1", hub="s3://models/hub")   # fc = Identity, eval mode
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from largessl.hub.store import BACKBONE, CARD, Hub, IntegrityError, sha256_bytes

DEFAULT_HUB_ENV = "LARGESSL_HUB"


def _verified_local(folder: Path) -> tuple[dict[str, Any], bytes]:
    """Card and backbone bytes of a pulled folder, the backbone checked against the card."""
    card = json.loads((folder / CARD).read_text())
    expected = card["files"][BACKBONE]
    data = (folder / BACKBONE).read_bytes()
    if len(data) != expected["size"] or sha256_bytes(data) != expected["sha256"]:
        raise IntegrityError(f"{folder / BACKBONE} does not match the sha256/size in its {CARD} (tampered or truncated)")
    return card, data


def backbone_from_card(card: dict[str, Any], weights: bytes) -> nn.Module:
    """Build the card's architecture and load ``weights`` (safetensors bytes) strictly."""
    from largessl.hub.export import build_backbone_from_config

    arch = card["architecture"]
    net = build_backbone_from_config({"arch": arch["arch"], "small_input": arch.get("small_input", False)})
    net.load_state_dict(load_safetensors_bytes(weights), strict=True)
    return net.eval()


def load_backbone(ref: str | os.PathLike[str], hub: str | None = None, endpoint_url: str = "",
                  with_card: bool = False, allow_yanked: bool = True) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """A torchvision ResNet (fc=Identity, ``num_features`` set, eval mode) with verified hub weights.

    ``ref`` is ``NAME[@VERSION]`` in ``hub`` (default: $LARGESSL_HUB, else ``hub``) or a folder written by
    ``largessl hub pull``. Every byte loaded is checked against the recorded sha256 first. With
    ``with_card`` the model card is returned too. ``NAME``/``NAME@latest`` never resolves to a yanked
    version; code pinned to a yanked ``NAME@VERSION`` keeps loading it with a logged warning
    (``allow_yanked=False`` refuses it instead, as ``hub pull`` and ``hub export`` do).
    """
    folder = Path(os.fspath(ref))
    if (folder / CARD).is_file():
        card, data = _verified_local(folder)
    else:
        store = Hub(hub or os.environ.get(DEFAULT_HUB_ENV, "hub"), endpoint_url)
        card, files = store.read_verified(str(ref), [BACKBONE], allow_yanked=allow_yanked)
        data = files[BACKBONE]
    net = backbone_from_card(card, data)
    return (net, card) if with_card else net
