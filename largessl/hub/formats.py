"""Export a hub version for other libraries: ``largessl hub export NAME@VERSION DIR --format FORMAT``.

- ``torchvision``: ``model.safetensors`` (torchvision ResNet keys, no ``fc``) + ``config.json`` + README.md.
- ``timm``: ``config.json`` (``architecture``, ``num_classes`` 0, ``pretrained_cfg``) + ``model.safetensors``:
  ``timm.create_model("local-dir:DIR", pretrained=True)`` or
  ``timm.create_model("resnet50", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=DIR/model.safetensors))``.
  timm's ResNets use torchvision's parameter names, so the tensors are the hub's, unchanged.
- ``hf``: the timm files plus a README.md model card with Hugging Face metadata (``library_name: timm``),
  a folder ready for ``huggingface_hub.upload_folder``; after the upload ``timm.create_model("hf-hub:ORG/NAME")``.
- ``detectron2``: ``model.pkl`` in the layout of detectron2's torchvision converter
  (``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": True}``, names like
  ``stem.conv1.norm.weight`` and ``res2.0.shortcut.weight``) + ``config.yaml`` with the settings those
  weights need (RGB input in 0-255 with ImageNet mean/std, ``STRIDE_IN_1X1: False``). This is the one
  pickle largessl writes, because detectron2 reads only that; it holds nothing but NumPy arrays built
  from bytes, strings and booleans, and it never enters the hub.

Everything is written into a temporary folder beside ``DIR`` and renamed into place at the end, so a
failed export leaves nothing behind. Weights come from a hub (sha256-verified) or a pulled folder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from largessl.hub.records import human_number
from largessl.hub.weights import default_hub, read_backbone

FORMATS = ("torchvision", "timm", "hf", "detectron2")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = "model.safetensors"
D2_WEIGHTS = "model.pkl"
D2_CONFIG = "config.yaml"
TIMM_CONFIG = "config.json"
README = "README.md"
TIMM_PREFIX = "timm/"
"""``model.arch`` prefix of timm backbones (their state_dict keys are already timm's)."""


def timm_create_args(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, ``timm.create_model`` keyword arguments) that rebuild the card's backbone in timm."""
    name = str(arch["arch"])
    if name.startswith(TIMM_PREFIX):
        kwargs: dict[str, Any] = {"num_classes": 0, **(arch.get("timm_kwargs") or {})}
        if arch.get("image_size"):
            kwargs["img_size"] = int(arch["image_size"])
        if not _takes_img_size(name[len(TIMM_PREFIX):], kwargs):
            kwargs.pop("img_size", None)
        return name[len(TIMM_PREFIX):], kwargs
    return name, {"num_classes": 0}


def _takes_img_size(name: str, kwargs: dict[str, Any]) -> bool:
    # the same rule as the trainer's build (largessl.models.timm_backbone): img_size where the model has one
    from largessl.hub.weights import build_backbone_from_config

    if "img_size" not in kwargs:
        return False
    net = build_backbone_from_config({"arch": TIMM_PREFIX + name, "image_size": kwargs["img_size"],
                                      "timm_kwargs": {k: v for k, v in kwargs.items()
                                                      if k not in ("num_classes", "img_size")}})
    return "img_size" in getattr(net, "timm_kwargs", {})


def check_format(fmt: str) -> str:
    """``fmt`` if it is a known export format, else ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return fmt


def unsupported_reason(fmt: str, arch: str, small_input: bool) -> str | None:
    """Why ``fmt`` cannot represent this backbone (None when it can)."""
    if arch.startswith(TIMM_PREFIX):
        if fmt in ("timm", "hf"):
            return None
        return f"{arch} is a timm model; export it --format timm (or hf): {fmt} holds torchvision ResNets only"
    if arch not in RESNETS:
        return f"{arch} is not a torchvision ResNet; the {fmt} format holds ResNets ({', '.join(RESNETS)}) only"
    if small_input and fmt != "torchvision":
        lib = "detectron2" if fmt == "detectron2" else "timm"
        return (f"this backbone has the small-input stem (3x3 conv, stride 1, no max-pool), which {lib}'s ResNet "
                "cannot build; export --format torchvision instead")
    return None


# ---------------------------------------------------------------------------------------------------
# Snippets (also shown in model cards and pages)


def export_command(ref: str, fmt: str, hub_url: str) -> str:
    """The CLI line that writes ``fmt`` for ``ref``."""
    return f"largessl hub export {ref} ./{_folder(ref, fmt)} --format {fmt} --hub {hub_url}"


def _folder(ref: str, fmt: str) -> str:
    return f"{ref.replace('@', '-')}-{fmt}"


def load_snippets(ref: str, hub_url: str, arch: str, small_input: bool) -> dict[str, str]:
    """Copy-paste code to load ``ref`` (NAME@VERSION) with largessl, torch.hub and each export format."""
    kind = f"timm {arch[len('timm/'):]}, num_classes=0" if arch.startswith("timm/") else "torchvision ResNet, fc = Identity"
    out = {
        "largessl": ("from largessl.hub import load_backbone\n"
                     f"net = load_backbone({ref!r}, hub={hub_url!r})  # {kind}, eval mode"),
        "torch.hub": ("import torch\n"
                      f"net = torch.hub.load('/path/to/largessl', {arch!r}, checkpoint={ref!r}, hub={hub_url!r}, "
                      "source='local')") if not arch.startswith("timm/") else
                     "# not available: hubconf.py's entry points are the torchvision ResNets; use load_backbone or "
                     "export --format timm",
    }
    for fmt in FORMATS:
        reason = unsupported_reason(fmt, arch, small_input)
        if reason:
            out[fmt] = f"# not available: {reason}"
            continue
        folder = _folder(ref, fmt)
        head = f"# {export_command(ref, fmt, hub_url)}\n"
        if fmt == "torchvision":
            stem = ("net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # small-input stem\n"
                    "net.maxpool = torch.nn.Identity()\n") if small_input else ""
            out[fmt] = (head + "import torch, torchvision\nfrom safetensors.torch import load_file\n"
                        f"net = torchvision.models.{arch}()\n{stem}net.fc = torch.nn.Identity()\n"
                        f"net.load_state_dict(load_file('{folder}/{WEIGHTS}'))")
        elif fmt == "timm" and arch.startswith(TIMM_PREFIX):
            out[fmt] = (head + "import timm\n"
                        f"net = timm.create_model('local-dir:{folder}', pretrained=True)  # num_classes=0: features\n"
                        "# or: timm.create_model(NAME, pretrained=False, **config.json['model_args']) and "
                        f"net.load_state_dict(safetensors.torch.load_file('{folder}/{WEIGHTS}'))")
        elif fmt == "timm":
            out[fmt] = (head + "import timm\n"
                        f"net = timm.create_model('local-dir:{folder}', pretrained=True)  # num_classes=0: features\n"
                        f"# or: timm.create_model({arch!r}, pretrained=True, num_classes=0, "
                        f"pretrained_cfg_overlay=dict(file='{folder}/{WEIGHTS}'))")
        elif fmt == "hf":
            name = ref.split("@", 1)[0]
            out[fmt] = (head + "from huggingface_hub import upload_folder\n"
                        f"upload_folder(repo_id='YOUR-ORG/{name}', folder_path='{folder}')\n"
                        f"# then: timm.create_model('hf-hub:YOUR-ORG/{name}', pretrained=True)")
        else:
            out[fmt] = head + "# merge into your detectron2 config:\n" + detectron2_config(arch, f"{folder}/{D2_WEIGHTS}")
    return out


# ---------------------------------------------------------------------------------------------------
# detectron2


_LAYER = re.compile(r"^layer([1-4])$")
_BN = re.compile(r"^bn([1-3])$")


def detectron2_key(key: str) -> str:
    """torchvision ResNet parameter name → detectron2's (``layer1.0.bn1.weight`` → ``res2.0.conv1.norm.weight``)."""
    parts = key.split(".")
    if not _LAYER.match(parts[0]):
        parts = ["stem", *parts]
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if m := _LAYER.match(p):
            out.append(f"res{int(m.group(1)) + 1}")
        elif m := _BN.match(p):
            out += [f"conv{m.group(1)}", "norm"]
        elif p == "downsample" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(p)
        i += 1
    return ".".join(out)


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """detectron2-named NumPy arrays (BatchNorm's ``num_batches_tracked`` counters are not weights: dropped)."""
    return {detectron2_key(k): v.detach().cpu().numpy().copy() for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


class _PlainArrayPickler(pickle.Pickler):
    """Pickles arrays as ``numpy.ndarray(shape, dtype string, bytearray)``: readable by any NumPy version."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            c = np.ascontiguousarray(obj)
            return np.ndarray, (c.shape, c.dtype.str, bytearray(c.tobytes()))
        return NotImplemented


def detectron2_pickle(state: dict[str, torch.Tensor]) -> bytes:
    """The bytes of a detectron2 ``.pkl`` for a torchvision ResNet state_dict."""
    buf = io.BytesIO()
    _PlainArrayPickler(buf, protocol=4).dump(
        {"model": detectron2_state(state), "__author__": "largessl", "matching_heuristics": True})
    return buf.getvalue()


def detectron2_config(arch: str, weights: str) -> str:
    """The detectron2 config lines torchvision-layout weights need (see detectron2's converter notes)."""
    depth = int(arch.removeprefix("resnet"))
    res2 = "\n    RES2_OUT_CHANNELS: 64" if depth < 50 else ""
    return (f"MODEL:\n  WEIGHTS: {weights}\n  PIXEL_MEAN: [123.675, 116.28, 103.53]\n"
            f"  PIXEL_STD: [58.395, 57.12, 57.375]\n  RESNETS:\n    DEPTH: {depth}\n    STRIDE_IN_1X1: False{res2}\n"
            "INPUT:\n  FORMAT: RGB\n")


# ---------------------------------------------------------------------------------------------------
# timm / Hugging Face


def timm_config(card: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` for the card's backbone: architecture, features only, preprocessing."""
    arch = card["architecture"]
    size = int(card.get("config", {}).get("data", {}).get("image_size", 224) or 224)
    if str(arch["arch"]).startswith(TIMM_PREFIX):
        return _timm_model_config(card, size)
    return {
        "architecture": arch["arch"],
        "num_classes": 0,
        "num_features": int(arch["num_features"]),
        "global_pool": "avg",
        "pretrained_cfg": _pretrained_cfg(card, size, pool_size=[max(size // 32, 1)] * 2, first_conv="conv1",
                                          classifier="fc", fixed_input_size=False),
        "largessl": _provenance(card),
    }


def _pretrained_cfg(card: dict[str, Any], size: int, **extra: Any) -> dict[str, Any]:
    """timm's ``pretrained_cfg``: the preprocessing largessl's evaluation used, the license, and ``extra``."""
    return {
        "input_size": [3, size, size],
        "interpolation": "bicubic",  # largessl's evaluation resize
        "crop_pct": 0.875 if size > 64 else 1.0,
        "crop_mode": "center",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": 0,
        **extra,
        "license": _hf_license(card)[0],
    }


def _timm_model_config(card: dict[str, Any], size: int) -> dict[str, Any]:
    """config.json of a timm backbone: timm reads ``architecture`` and ``model_args`` (the exact build arguments)."""
    name, kwargs = timm_create_args(card["architecture"])
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(card["architecture"]["num_features"]),
        "model_args": kwargs,
        "pretrained_cfg": _pretrained_cfg(card, size, fixed_input_size="img_size" in kwargs),
        "largessl": _provenance(card),
    }


def _hf_license(card: dict[str, Any]) -> tuple[str, str]:
    lic = str(card.get("license") or "unspecified")
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", lic) and lic != "unspecified":
        return lic, ""
    return "other", lic


def _provenance(card: dict[str, Any]) -> dict[str, Any]:
    ds = card.get("dataset", {})
    return {"model": f"{card.get('name')}@{card.get('version')}", "method": card.get("method"),
            "dataset": ds.get("name"), "manifest_id": ds.get("manifest_id"),
            "manifest_sha256": ds.get("manifest_sha256"), "git_revision": card.get("git_revision"),
            "backbone_sha256": card.get("files", {}).get("backbone.safetensors", {}).get("sha256")}


def readme(card: dict[str, Any], fmt: str, hub_url: str) -> str:
    """README.md for an export folder (with Hugging Face front matter for ``hf``)."""
    ref = f"{card.get('name')}@{card.get('version')}"
    arch = card["architecture"]
    ds = card.get("dataset", {})
    paper = card.get("paper", {})
    lines = []
    if fmt == "hf":
        lic, lic_name = _hf_license(card)
        tags = ["image-feature-extraction", "timm", "largessl", "self-supervised-learning", str(card.get("method"))]
        lines += ["---", "library_name: timm", f"license: {lic}"]
        if lic_name:
            lines.append(f"license_name: {json.dumps(lic_name)}")
        lines += ["pipeline_tag: image-feature-extraction", "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines += [f"# {ref}", "",
              f"A {arch['arch']} backbone ({arch['num_features']} features, no classifier) pretrained with "
              f"{card.get('method')} by largessl" + (f" ({paper['citation']})" if paper.get("citation") else "") + ".",
              "", f"- Dataset: {ds.get('name', '?')} (manifest id `{ds.get('manifest_id')}`, "
              f"sha256 `{ds.get('manifest_sha256')}`)",
              f"- Trained for {human_number(card.get('epochs'))} epochs ({card.get('step')} steps), git revision "
              f"`{card.get('git_revision')}`", f"- License: {card.get('license', 'unspecified')}"]
    for key, val in sorted(card.get("metrics", {}).items()):
        if isinstance(val, (int, float)) and key.endswith(("top1", "top5")):
            lines.append(f"- {key}: {val:.2f}")
    snippet = load_snippets(ref, hub_url, arch["arch"], bool(arch.get("small_input")))[fmt]
    lines += ["", "## Load", "", "```python" if fmt != "detectron2" else "```yaml",
              snippet.split("\n", 1)[1] if snippet.startswith("# largessl") else snippet, "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The export itself


def export_model(ref: str | os.PathLike[str], out_dir: str | os.PathLike[str], fmt: str, hub: str | None = None,
                 endpoint_url: str = "", allow_yanked: bool = False) -> Path:
    """Write ``fmt`` files for a hub version (``NAME[@VERSION]``) or a pulled folder into the new folder ``out_dir``."""
    check_format(fmt)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export destination {out} exists and is not an empty directory; choose a new path")
    card, weights = read_backbone(ref, hub, endpoint_url, allow_yanked)
    arch = card["architecture"]
    reason = unsupported_reason(fmt, arch["arch"], bool(arch.get("small_input")))
    if reason:
        raise ValueError(f"cannot export {card.get('name')}@{card.get('version')} as {fmt}: {reason}")
    state = load_safetensors_bytes(weights)
    hub_url = default_hub(hub)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if fmt == "detectron2":
            (tmp / D2_WEIGHTS).write_bytes(detectron2_pickle(state))
            (tmp / D2_CONFIG).write_text(detectron2_config(arch["arch"], str(out / D2_WEIGHTS)))
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
            if fmt == "torchvision":
                cfg = {"format": "largessl-torchvision/1", "arch": arch["arch"],
                       "small_input": bool(arch.get("small_input")), "num_features": int(arch["num_features"]),
                       "weights": "torchvision ResNet state_dict without fc", "largessl": _provenance(card)}
            else:
                cfg = timm_config(card)
            (tmp / TIMM_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / README).write_text(readme(card, fmt, hub_url))
        if out.exists():
            out.rmdir()  # empty by the check above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
