"""Verified backbone weights from a hub or a pulled folder, and the module they load into.

The one place that reads a published backbone: :func:`largessl.hub.load_backbone` and the exporters
(:mod:`largessl.hub.formats`) both stand on it. Every byte is checked against its recorded sha256 first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from largessl.hub.records import BACKBONE, CARD
from largessl.hub.store import Hub, IntegrityError, sha256_bytes
from largessl.run.checkpoint import load_model_state

DEFAULT_HUB_ENV = "LARGESSL_HUB"
BACKBONE_PREFIX = "backbone."


def default_hub(hub: str | None = None) -> str:
    """``hub``, else $LARGESSL_HUB, else ``hub`` (a local directory)."""
    return hub or os.environ.get(DEFAULT_HUB_ENV, "hub")


def verified_local(folder: Path) -> tuple[dict[str, Any], bytes]:
    """Card and backbone bytes of a pulled folder, the backbone checked against the card."""
    card = json.loads((folder / CARD).read_text())
    expected = card["files"][BACKBONE]
    data = (folder / BACKBONE).read_bytes()
    if len(data) != expected["size"] or sha256_bytes(data) != expected["sha256"]:
        raise IntegrityError(f"{folder / BACKBONE} does not match the sha256/size in its {CARD} (tampered or truncated)")
    return card, data


def read_backbone(ref: str | os.PathLike[str], hub: str | None = None, endpoint_url: str = "",
                  allow_yanked: bool = True) -> tuple[dict[str, Any], bytes]:
    """(card, verified backbone safetensors bytes) of ``NAME[@VERSION]`` in ``hub`` or of a pulled folder."""
    folder = Path(os.fspath(ref))
    if (folder / CARD).is_file():
        return verified_local(folder)
    store = Hub(default_hub(hub), endpoint_url)
    card, files = store.read_verified(str(ref), [BACKBONE], allow_yanked=allow_yanked)
    return card, files[BACKBONE]


def build_backbone_from_config(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """A fresh backbone (torchvision ResNet with fc=Identity, or the timm model) for a ``model`` config section, on CPU."""
    from largessl.models import ModelConfig, build_backbone

    # export/inference need plain BatchNorm2d: SyncBatchNorm has the same state_dict keys; drop-path is
    # training-only and holds no weights
    cfg = ModelConfig(arch=model_cfg.get("arch", "resnet50"), small_input=bool(model_cfg.get("small_input", False)),
                      sync_bn=False, zero_init_residual=False, image_size=int(model_cfg.get("image_size", 0) or 0),
                      timm_kwargs=dict(model_cfg.get("timm_kwargs") or {}))
    return build_backbone(cfg)


def backbone_from_card(card: dict[str, Any], weights: bytes) -> nn.Module:
    """Build the card's architecture and load ``weights`` (safetensors bytes) strictly."""
    arch = card["architecture"]
    net = build_backbone_from_config(arch)
    net.load_state_dict(load_safetensors_bytes(weights), strict=True)
    return net.eval()


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a method-module state_dict, prefix removed (torchvision key names)."""
    out = {k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}
    # a checkpoint of a torch.compile'd backbone would carry _orig_mod.; strip it so keys stay torchvision's
    out = {k.replace("_orig_mod.", ""): v for k, v in out.items()}
    if not out:
        raise ValueError(f"the checkpoint has no '{BACKBONE_PREFIX}*' weights (keys start with "
                         f"{sorted({k.split('.')[0] for k in model_state})}); is it a largessl pretraining checkpoint?")
    return out


def load_backbone_from_checkpoint(path_or_run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(backbone with the checkpoint's weights, resolved config dict, meta) from a run dir or step folder."""
    state, config, meta = load_model_state(str(path_or_run_dir))
    net = build_backbone_from_config(config.get("model", {}))
    net.load_state_dict(backbone_state(state), strict=True)
    return net, config, meta
