"""Export a pretraining run's backbone as safetensors plus a model card, and push it to a hub."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from largessl.hub.card import METRICS_FILE, build_card
from largessl.hub.store import BACKBONE, Hub, check_name, utc_now

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
CHECKPOINT_DIR = "checkpoint"


def backbone_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a method-module state_dict, prefix removed (torchvision key names)."""
    out = {k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}
    # a checkpoint of a torch.compile'd backbone would carry _orig_mod.; strip it so keys stay torchvision's
    out = {k.replace("_orig_mod.", ""): v for k, v in out.items()}
    if not out:
        raise ValueError(f"the checkpoint has no '{BACKBONE_PREFIX}*' weights (keys start with "
                         f"{sorted({k.split('.')[0] for k in model_state})}); is it a largessl pretraining checkpoint?")
    return out


def build_backbone_from_config(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """A fresh torchvision ResNet (fc=Identity) for a checkpoint's ``model`` config section, on CPU."""
    from largessl.models import ModelConfig, build_backbone

    # export/inference need plain BatchNorm2d: SyncBatchNorm has the same state_dict keys
    cfg = ModelConfig(arch=model_cfg.get("arch", "resnet50"), small_input=bool(model_cfg.get("small_input", False)),
                      sync_bn=False, zero_init_residual=False)
    return build_backbone(cfg)


def load_backbone_from_checkpoint(path_or_run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(backbone with the checkpoint's weights, resolved config dict, meta) from a run dir or step folder."""
    from largessl.train.checkpoint import load_model_state

    state, config, meta = load_model_state(str(path_or_run_dir))
    net = build_backbone_from_config(config.get("model", {}))
    net.load_state_dict(backbone_state(state), strict=True)
    return net, config, meta


def _run_dir_of(path: str | Path, meta: dict[str, Any]) -> Path | None:
    """The run directory holding metrics.jsonl and eval/: ``path`` itself or the checkpoint's grandparent."""
    p = Path(str(path))
    if "://" in str(path):
        return None
    for cand in (p, Path(str(meta.get("path", ""))).parent.parent):
        if (cand / METRICS_FILE).is_file() or (cand / "config.yaml").is_file():
            return cand
    return None


def _dataset_info(config: dict[str, Any]) -> dict[str, Any]:
    url = config.get("data", {}).get("train_manifest", "")
    info: dict[str, Any] = {"train_manifest": url}
    if not url:
        return info
    try:
        from largessl.data.manifest import read_manifest

        m = read_manifest(url, check_shards=False)
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("cannot read the training manifest %s (%s); the card records its URL only", url, e)
        return info
    info.update(manifest_id=m.id, num_samples=m.num_samples, num_classes=m.num_classes,
                name=str(m.extra.get("name", "")) or Path(url.rstrip("/")).parent.name)
    return info


def default_name(config: dict[str, Any]) -> str:
    """``<method>-<arch>`` (e.g. barlow_twins-resnet50) when no hub name is configured."""
    return check_name(f"{config.get('method', {}).get('name', 'model')}-{config.get('model', {}).get('arch', 'net')}")


def default_version() -> str:
    """``v<UTC timestamp>`` (e.g. v20260102-030405): unique per second and sortable."""
    return "v" + utc_now().replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")


def export_run(path_or_run_dir: str | Path, out_dir: str | Path,
               include_full_checkpoint: bool = False) -> tuple[dict[str, Path], dict[str, Any], dict[str, Any]]:
    """Write ``backbone.safetensors`` (and optionally the checkpoint's files) into ``out_dir``.

    Returns ({relative path: local file}, card without hashes, index summary). The checkpoint is only read.
    """
    net, config, meta = load_backbone_from_checkpoint(path_or_run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = config.get("model", {}).get("arch", "resnet50")
    small = bool(config.get("model", {}).get("small_input", False))
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out / BACKBONE), metadata={"arch": arch, "small_input": str(small).lower(),
                                                      "format": "torchvision-resnet-without-fc"})
    files: dict[str, Path] = {BACKBONE: out / BACKBONE}
    if include_full_checkpoint:
        files.update(_copy_checkpoint(str(meta["path"]), out / CHECKPOINT_DIR))
    card, summary = build_card(config, meta, _run_dir_of(path_or_run_dir, meta), int(net.num_features),
                               _dataset_info(config))
    return files, card, summary


def _copy_checkpoint(ckpt: str, dest: Path) -> dict[str, Path]:
    """Copy (or download) every file of a checkpoint folder; keys are ``checkpoint/<relative path>``."""
    if "://" in ckpt and not ckpt.startswith("file://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(ckpt)
        fs.get(root, str(dest), recursive=True)
    else:
        shutil.copytree(ckpt.removeprefix("file://"), dest)
    return {f"{CHECKPOINT_DIR}/{p.relative_to(dest).as_posix()}": p for p in sorted(dest.rglob("*")) if p.is_file()}


def push_run(path_or_run_dir: str | Path, hub_url: str = "hub", name: str = "", version: str = "",
             endpoint_url: str = "", include_full_checkpoint: bool = False) -> dict[str, Any]:
    """Export a run's backbone and publish it as ``name@version``; returns the published card."""
    hub = Hub(hub_url, endpoint_url)
    version = check_name(version, "version") if version else default_version()
    if name and hub.exists(check_name(name, "model name"), version):  # fail before exporting anything
        raise ValueError(f"{name}@{version} already exists in hub {hub_url}; versions are immutable, "
                         "push a new --version")
    with tempfile.TemporaryDirectory(prefix="largessl-push-") as tmp:
        files, card, summary = export_run(path_or_run_dir, tmp, include_full_checkpoint)
        name = name or default_name(card["config"])
        published = hub.push(name, version, {k: str(v) for k, v in files.items()}, card, summary)
    return published
