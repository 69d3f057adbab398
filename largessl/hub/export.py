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

from safetensors.torch import save_file

from largessl.hub.card import build_card, dataset_info
from largessl.hub.records import BACKBONE, check_name
from largessl.hub.store import Hub, utc_now
from largessl.hub.weights import load_backbone_from_checkpoint
from largessl.run.layout import run_dir_of

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


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
    card, summary = build_card(config, meta, run_dir_of(path_or_run_dir, str(meta.get("path", ""))), int(net.num_features),
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
    from largessl.run.checkpoint import MARKER

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
             hub: Hub | None = None, force: bool = False) -> dict[str, Any]:
    """Export a run's backbone and publish it as ``name@version``; returns the published card.

    ``license`` defaults to the run config's ``hub.license``. ``hub`` overrides ``hub_url``/``endpoint_url``
    (e.g. a single-writer hub). A run the collapse guard stopped is refused unless ``force``.
    """
    from largessl.hub.formats import load_snippets
    from largessl.run.layout import STATE_FILE
    from largessl.run.state import COLLAPSED, read_state

    given = Path(str(path_or_run_dir))  # a run dir, its checkpoints/ folder or a step-N/ folder
    run_dir = next((c for c in (given, given.parent, given.parent.parent) if (c / STATE_FILE).is_file()), None)
    state = read_state(run_dir) if run_dir is not None and "://" not in str(path_or_run_dir) else None
    if state and state.get("state") == COLLAPSED and not force:
        raise ValueError(f"{run_dir} was stopped by the collapse guard ({state.get('reason', 'collapsed')}); its "
                         "backbone is not worth publishing. Pass --force (force=True) to push it anyway")
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
    if run_dir is not None:
        from largessl.run.trackers import tag_hub_version

        tag_hub_version(run_dir, f"{name}@{version}", hub.url)
    return published
