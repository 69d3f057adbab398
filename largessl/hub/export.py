"""Export a pretraining run's backbone as safetensors plus a model card, and push it to a hub.

With ``include_full_checkpoint`` the whole training checkpoint is published too, pickle-free: every
torch ``.pt`` file (ours and DeepSpeed's) becomes safetensors + JSON (:mod:`largessl.hub.pickle_free`),
DeepSpeed's helper scripts are left out, and ``COMPLETE.json`` is rewritten to list the published files.
A file that cannot be converted stops the push before anything is uploaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from largessl.hub.card import METRICS_FILE, build_card, dataset_info
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


def default_name(config: dict[str, Any]) -> str:
    """``<method>-<arch>`` (e.g. barlow_twins-resnet50) when no hub name is configured."""
    return check_name(f"{config.get('method', {}).get('name', 'model')}-{config.get('model', {}).get('arch', 'net')}")


def default_version() -> str:
    """``v<UTC timestamp>`` (e.g. v20260102-030405): unique per second and sortable."""
    return "v" + utc_now().replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")


def export_run(path_or_run_dir: str | Path, out_dir: str | Path, include_full_checkpoint: bool = False,
               license: str = "") -> tuple[dict[str, Path], dict[str, Any], dict[str, Any]]:
    """Write ``backbone.safetensors`` (and optionally the pickle-free checkpoint) into ``out_dir``.

    Returns ({relative path: local file}, card without hashes, index summary). The checkpoint is only read.
    """
    net, config, meta = load_backbone_from_checkpoint(path_or_run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = config.get("model", {}).get("arch", "resnet50")
    small = bool(config.get("model", {}).get("small_input", False))
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # one metadata key: safetensors writes several in random order, and a hub file's bytes should not vary
    info = {"arch": arch, "small_input": small, "format": "torchvision-resnet-without-fc"}
    save_file(tensors, str(out / BACKBONE), metadata={"largessl": json.dumps(info, sort_keys=True)})
    files: dict[str, Path] = {BACKBONE: out / BACKBONE}
    if include_full_checkpoint:
        files.update(_copy_checkpoint(str(meta["path"]), out / CHECKPOINT_DIR))
    license = license or str(config.get("hub", {}).get("license", "") or "")
    if not license:
        log.warning("no license given for this model (--license or hub.license); the card says 'unspecified'")
    card, summary = build_card(config, meta, _run_dir_of(path_or_run_dir, meta), int(net.num_features),
                               dataset_info(config), license=license)
    return files, card, summary


def _copy_checkpoint(ckpt: str, dest: Path) -> dict[str, Path]:
    """Copy (or download) every file of a checkpoint folder; keys are ``checkpoint/<relative path>``."""
    if "://" in ckpt and not ckpt.startswith("file://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(ckpt)
        fs.get(root, str(dest), recursive=True)
    else:
        shutil.copytree(ckpt.removeprefix("file://"), dest)
    make_pickle_free(dest)
    return {f"{CHECKPOINT_DIR}/{p.relative_to(dest).as_posix()}": p for p in sorted(dest.rglob("*")) if p.is_file()}


def make_pickle_free(folder: Path) -> dict[str, Any]:
    """Convert every pickle in a copied checkpoint folder to safetensors + JSON, in place; rewrites the marker.

    DeepSpeed's helper scripts (``zero_to_fp32.py``: code, not state) are removed. Raises ``ValueError``
    naming the file when a pickle holds anything but tensors, plain data and DeepSpeed's scalar classes.
    """
    from largessl.hub.pickle_free import FORMAT, PickleRefused, convert_pt_file, is_pickle_file
    from largessl.hub.store import sha256_file
    from largessl.train.checkpoint import MARKER

    converted: dict[str, list[str]] = {}
    omitted: dict[str, str] = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if rel == MARKER:
            continue
        if p.suffix == ".py":
            p.unlink()
            omitted[rel] = "a script (code, not state) that DeepSpeed writes beside its checkpoint"
        elif is_pickle_file(p):
            try:
                outs = convert_pt_file(p)
            except PickleRefused as e:
                raise ValueError(f"--full-checkpoint: cannot publish {rel} without pickle: {e}") from None
            converted[rel] = [o.relative_to(folder).as_posix() for o in outs]
    marker_path = folder / MARKER
    marker = json.loads(marker_path.read_text()) if marker_path.is_file() else {}
    marker["files"] = {q.relative_to(folder).as_posix(): sha256_file(q) for q in sorted(folder.rglob("*"))
                       if q.is_file() and q != marker_path}
    marker["pickle_free"] = {"format": FORMAT, "converted": converted, "omitted": omitted,
                             "load": "largessl.hub.pickle_free.load_pickle_free('<file>.json')"}
    marker_path.write_text(json.dumps(marker, indent=1, sort_keys=True))
    if converted or omitted:
        log.info("full checkpoint made pickle-free: %d file(s) converted, %d left out", len(converted), len(omitted))
    return marker


def push_run(path_or_run_dir: str | Path, hub_url: str = "hub", name: str = "", version: str = "",
             endpoint_url: str = "", include_full_checkpoint: bool = False, license: str = "",
             hub: Hub | None = None) -> dict[str, Any]:
    """Export a run's backbone and publish it as ``name@version``; returns the published card.

    ``license`` defaults to the run config's ``hub.license``. ``hub`` overrides ``hub_url``/``endpoint_url``
    (e.g. a single-writer hub).
    """
    from largessl.hub.formats import load_snippets

    hub = hub or Hub(hub_url, endpoint_url)
    version = check_name(version, "version") if version else default_version()
    if name and hub.exists(check_name(name, "model name"), version):  # fail before exporting anything
        raise ValueError(f"{name}@{version} already exists in hub {hub.url}; versions are immutable, "
                         "push a new --version")
    with tempfile.TemporaryDirectory(prefix="largessl-push-") as tmp:
        files, card, summary = export_run(path_or_run_dir, tmp, include_full_checkpoint, license)
        name = name or default_name(card["config"])
        arch = card["architecture"]
        card["snippets"] = load_snippets(f"{name}@{version}", hub.url, arch["arch"], arch["small_input"])
        published = hub.push(name, version, {k: str(v) for k, v in files.items()}, card, summary)
    return published
