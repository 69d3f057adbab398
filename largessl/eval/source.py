"""What is evaluated: a backbone from a run's checkpoint, a hub model, a pulled folder or a random init.

``--checkpoint`` of ``largessl eval`` and the stages of a pretraining run resolve here; the backbone's own
resolved config becomes the base of the evaluation's config (image size and stem match pretraining).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from largessl.config import Config, config_to_dict, load_config
from largessl.eval.features import weights_hash
from largessl.hub.api import load_backbone
from largessl.hub.records import CARD
from largessl.hub.weights import load_backbone_from_checkpoint
from largessl.models import build_backbone
from largessl.run.layout import run_dir_of

HUB_PREFIX = "hub:"
RANDOM = "random"


@dataclass
class EvalSource:
    """The backbone under evaluation and where it came from (recorded in the results)."""

    backbone: nn.Module
    description: dict[str, Any] = field(default_factory=dict)
    """E.g. {"checkpoint": ".../step-00000100", "step": 100} or {"hub": "s3://...", "model": "bt@v1"}."""
    _weights: str = ""

    @property
    def weights(self) -> str:
        """sha256 of the backbone's weights (the feature cache and resumable stages are keyed by it)."""
        if not self._weights:
            self._weights = weights_hash(self.backbone)
        return self._weights

    @property
    def cache_key(self) -> str:
        """Short form of :attr:`weights` for file names."""
        return self.weights[:16]


def load_source(checkpoint: str, base_cfg: Config | None = None, hub_url: str | None = None,
                endpoint_url: str = "") -> tuple[EvalSource, dict[str, Any], Path | None]:
    """(EvalSource, the model's config dict, its run dir or None) for a ``--checkpoint`` argument."""
    if checkpoint == RANDOM:
        if base_cfg is None:
            raise ValueError("--checkpoint random needs a config for the architecture (model.* overrides)")
        cfg_dict = config_to_dict(base_cfg)
        # The encoder exactly as pretraining starts from it (same model.* config, zero_init_residual
        # included), so "pretrained vs random" measures what training added.
        torch.manual_seed(base_cfg.train.seed)
        net = build_backbone(dataclasses.replace(base_cfg.model, sync_bn=False))
        return EvalSource(net, {"random_init": True, "seed": base_cfg.train.seed,
                                "zero_init_residual": base_cfg.model.zero_init_residual}), cfg_dict, None
    if checkpoint.startswith(HUB_PREFIX):
        ref = checkpoint[len(HUB_PREFIX):]
        url = hub_url or (base_cfg.hub.url if base_cfg else "hub")
        net, card = load_backbone(ref, hub=url, endpoint_url=endpoint_url, with_card=True)
        desc = {"hub": url, "model": f"{card['name']}@{card['version']}"}
        return EvalSource(net, desc), card.get("config", {}), None
    path = Path(checkpoint)
    if (path / CARD).is_file():
        net, card = load_backbone(path, with_card=True)
        return EvalSource(net, {"pulled": str(path.resolve()), "model": f"{card['name']}@{card['version']}"}), \
            card.get("config", {}), None
    net, cfg_dict, meta = load_backbone_from_checkpoint(checkpoint)
    desc = {"checkpoint": str(meta.get("path", checkpoint)), "step": meta.get("step")}
    return EvalSource(net, desc), cfg_dict, run_dir_of(checkpoint, str(meta.get("path", "")))


def resolve_config(model_cfg: dict[str, Any], files: list[str], overrides: list[str]) -> Config:
    """The model's config as the base, then ``files``, then ``overrides`` (checked like any config)."""
    with tempfile.TemporaryDirectory(prefix="largessl-eval-") as tmp:
        base = Path(tmp) / "model_config.yaml"
        base.write_text(yaml.safe_dump(json.loads(json.dumps(model_cfg)), sort_keys=False))
        return load_config([base, *files], overrides)
