"""Nothing that unpickles leaves the hub: detect pickles, and turn torch ``.pt`` files into safetensors + JSON.

A ``.pt`` file (``torch.save``: a zip archive whose ``data.pkl`` is a pickle) runs code when it is loaded
with ``weights_only=False``. The hub stores none: :func:`convert_pt_file` loads one with
``torch.load(weights_only=True)`` (plus four DeepSpeed classes that are plain data, see
``DEEPSPEED_GLOBALS``) and writes

    <stem>.safetensors   every tensor of the object, under generated keys t0, t1, ...
    <stem>.json          the object's structure (dicts, lists, numbers, strings) with {"__tensor__": "t0"} leaves

:func:`load_pickle_free` rebuilds the same object (values equal to ``torch.load`` of the original; tensors
that shared storage come back as separate tensors). Any other class inside a ``.pt`` file is refused with
its name, never unpickled.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import enum
import hashlib
import importlib
import io
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

log = logging.getLogger(__name__)

FORMAT = "largessl-pickle-free/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
"""File names that are pickles by convention (checked together with the content)."""

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Classes in DeepSpeed's ZeRO optimizer files whose state is plain numbers (loss scale, stage, offsets).

They are the only non-torch globals a ``.pt`` file may name; they are rebuilt from their ``__dict__`` (or
enum value), never by running pickle's constructor calls on untrusted names.
"""

_SAFETENSORS_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                       torch.bfloat16, torch.float32, torch.float64}
_TAGS = ("__tensor__", "__ndarray__", "__float__", "__tuple__", "__set__", "__dict__", "__odict__", "__bytes__",
         "__size__", "__dtype__", "__device__", "__enum__", "__object__", "__npscalar__")


class PickleRefused(ValueError):
    """A file holds a pickle that cannot be converted (it names classes outside the allowed set)."""


# ---------------------------------------------------------------------------------------------------
# Detection


def looks_like_pickle(head: bytes, name: str = "") -> bool:
    """True for pickle streams, torch zip archives (``*.pkl`` inside) and pickle file names."""
    if Path(name).suffix.lower() in PICKLE_SUFFIXES:
        return True
    if len(head) >= 9 and head[8:9] == b"{":
        return False  # safetensors: a little-endian u64 header length (may start 0x80 0x02...), then JSON
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode of pickle protocols 2-5
        return True
    if head[:4] == b"PK\x03\x04":
        return _zip_holds_pickle(io.BytesIO(head))
    return False


def _zip_holds_pickle(f: Any) -> bool:
    try:
        with zipfile.ZipFile(f) as z:
            return any(n.endswith((".pkl", "/data.pkl")) for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def is_pickle_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a pickle or a torch ``.pt`` archive (by name or by content)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(p, "rb") as f:
        head = f.read(16)
        if head[:4] == b"PK\x03\x04":
            f.seek(0)
            return _zip_holds_pickle(f)
    return looks_like_pickle(head)


def is_pickle_bytes(data: bytes, name: str = "") -> bool:
    """:func:`is_pickle_file` for bytes in memory (whole zip archives are inspected)."""
    if data[:4] == b"PK\x03\x04":
        return Path(name).suffix.lower() in PICKLE_SUFFIXES or _zip_holds_pickle(io.BytesIO(data))
    return looks_like_pickle(data[:16], name)


# ---------------------------------------------------------------------------------------------------
# Encoding


def _allowed_class(qualname: str) -> type:
    if qualname not in DEEPSPEED_GLOBALS:
        raise PickleRefused(f"{qualname} is not one of the classes largessl converts ({', '.join(DEEPSPEED_GLOBALS)})")
    module, _, attr = qualname.rpartition(".")
    if module.startswith("deepspeed"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # importing DeepSpeed must not probe for CUDA here
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{qualname} is needed to convert this DeepSpeed file but cannot be imported ({e}); "
                           "install the deepspeed extra: pip install 'largessl[deepspeed]'") from None


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Encoder:
    """Walks a ``torch.load`` result into JSON-able structure plus a flat tensor dict."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise PickleRefused(f"{self.where}: {path} is a {t.layout}/quantized/meta tensor; safetensors stores "
                                "dense tensors only")
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise PickleRefused(f"{self.where}: {path} has dtype {t.dtype}, which safetensors cannot store")
        key = f"t{len(self.tensors)}"
        # a fresh contiguous copy: safetensors refuses tensors that share storage (ZeRO's flat buffers do)
        self.tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    def encode(self, obj: Any, path: str = "$") -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, enum.Enum):
            try:
                _allowed_class(_qualname(obj))
            except PickleRefused:
                raise PickleRefused(f"{self.where}: {path} is a {_qualname(obj)}, which cannot be stored without "
                                    "pickle") from None
            return {"__enum__": _qualname(obj), "value": self.encode(obj.value, path + ".value")}
        if isinstance(obj, int) and type(obj) is int:
            return obj
        if isinstance(obj, float) and type(obj) is float:
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.nn.Parameter):
            return {"__tensor__": self._tensor(obj.data, path), "parameter": True, "requires_grad": obj.requires_grad}
        if isinstance(obj, torch.Tensor):
            out: dict[str, Any] = {"__tensor__": self._tensor(obj, path)}
            if obj.requires_grad:
                out["requires_grad"] = True
            return out
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise PickleRefused(f"{self.where}: {path} is a NumPy object array (pickled Python objects)")
            return {"__ndarray__": self._tensor(torch.from_numpy(np.ascontiguousarray(obj)), path)}
        if isinstance(obj, np.generic):
            return {"__npscalar__": str(obj.dtype), "value": self.encode(obj.item(), path)}
        if isinstance(obj, torch.Size):
            return {"__size__": list(obj)}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj)}
        if isinstance(obj, bytes):
            return {"__bytes__": base64.b64encode(obj).decode()}
        if isinstance(obj, collections.OrderedDict):
            return {"__odict__": [[self.encode(k, f"{path}.key"), self.encode(v, f"{path}[{k!r}]")]
                                  for k, v in obj.items()]}
        if type(obj) is dict:
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, f"{path}[{k!r}]") for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, f"{path}.key"), self.encode(v, f"{path}[{k!r}]")]
                                 for k, v in obj.items()]}
        if type(obj) is list:
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {"__tuple__": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, (set, frozenset)):
            return {"__set__": [self.encode(v, f"{path}.item") for v in obj], "frozen": isinstance(obj, frozenset)}
        name = _qualname(obj)
        try:
            _allowed_class(name)
        except PickleRefused:
            raise PickleRefused(f"{self.where}: {path} is a {name}, which cannot be stored without pickle") from None
        state = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(vars(obj))
        return {"__object__": name, "state": self.encode(state, path)}


# ---------------------------------------------------------------------------------------------------
# Decoding


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    # the encoder never writes plain dicts with '__' keys, so such a key marks a tagged value
    tag = next((k for k in node if k in _TAGS), None)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if tag == "__tensor__":
        t = tensors[node["__tensor__"]]
        if node.get("parameter"):
            return torch.nn.Parameter(t, requires_grad=bool(node.get("requires_grad", True)))
        return t.requires_grad_(True) if node.get("requires_grad") else t
    if tag == "__ndarray__":
        return tensors[node["__ndarray__"]].numpy()
    if tag == "__npscalar__":
        return np.dtype(node["__npscalar__"]).type(node["value"])
    if tag == "__float__":
        return float(node["__float__"])
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if tag == "__set__":
        items = [_decode(v, tensors) for v in node["__set__"]]
        return frozenset(items) if node.get("frozen") else set(items)
    if tag == "__dict__":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__dict__"]}
    if tag == "__odict__":
        return collections.OrderedDict((_decode(k, tensors), _decode(v, tensors)) for k, v in node["__odict__"])
    if tag == "__bytes__":
        return base64.b64decode(node["__bytes__"])
    if tag == "__size__":
        return torch.Size(node["__size__"])
    if tag == "__dtype__":
        return getattr(torch, node["__dtype__"])
    if tag == "__device__":
        return torch.device(node["__device__"])
    if tag == "__enum__":
        return _allowed_class(node["__enum__"])(_decode(node["value"], tensors))
    cls = _allowed_class(node["__object__"])
    obj = cls.__new__(cls)
    obj.__dict__.update(_decode(node["state"], tensors))
    return obj


# ---------------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_pt_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, allowing only ``DEEPSPEED_GLOBALS`` beyond torch's set.

    Raises :class:`PickleRefused` naming the classes when the file needs anything else.
    """
    p = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
    except Exception:  # legacy (non-zip) torch files cannot be inspected: weights_only decides below
        names = []
    unknown = [n for n in names if n not in DEEPSPEED_GLOBALS]
    if unknown:
        raise PickleRefused(
            f"{p.name} needs {', '.join(unknown)} to unpickle; largessl converts only tensors, plain Python data and "
            f"DeepSpeed's {', '.join(n.rsplit('.', 1)[1] for n in DEEPSPEED_GLOBALS)}. Push without "
            "--full-checkpoint (the backbone is always published as safetensors)")
    classes = [_allowed_class(n) for n in names]
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PickleRefused(f"{p.name} cannot be loaded with weights_only=True ({str(e).splitlines()[0][:300]}); "
                            "push without --full-checkpoint") from None


def convert_pt_file(path: str | os.PathLike[str], remove: bool = True) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` beside the torch file ``path``; returns both paths."""
    p = Path(path)
    tensors_path, json_path = p.with_suffix(".safetensors"), p.with_suffix(".json")
    for out in (tensors_path, json_path):
        if out.exists():
            raise PickleRefused(f"cannot convert {p.name}: {out.name} already exists beside it")
    obj = load_pt_weights_only(p)
    enc = _Encoder(p.name)
    skeleton = enc.encode(obj)
    save_safetensors_file(enc.tensors, str(tensors_path))
    doc = {"format": FORMAT, "source": p.name, "source_sha256": _sha256(p), "tensors": tensors_path.name,
           "tensors_sha256": _sha256(tensors_path), "object": skeleton}
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    if remove:
        p.unlink()
    return tensors_path, json_path


def load_pickle_free(json_path: str | os.PathLike[str]) -> Any:
    """Rebuild the object of a converted ``.pt`` from ``<stem>.json`` and its safetensors file (hash-checked)."""
    jp = Path(json_path)
    doc = json.loads(jp.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{jp} is not a {FORMAT} file (format {doc.get('format')!r})")
    tp = jp.with_name(doc["tensors"])
    if _sha256(tp) != doc["tensors_sha256"]:
        raise ValueError(f"{tp} does not match the sha256 recorded in {jp.name}")
    return _decode(doc["object"], load_safetensors_file(str(tp)))
