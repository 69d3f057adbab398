"""Atomic, hash-verified training checkpoints: one ``step-N/`` folder per save.

Layout of ``<ckpt_dir>/step-00000123/``::

    model.safetensors   consolidated state_dict of the method module (backbone.*, projector.*, ...), rank 0
    training.pt         optimizer, scheduler, scaler, step, epoch, extra state (rank 0; torch.save of tensors/primitives)
    rank-00001.pt       per-rank RNG states and data position (every rank)
    meta.json           step, epoch, git revision, last metrics, resolved config (rank 0)
    deepspeed/          DeepSpeed's own per-rank files (only with dist.strategy=deepspeed; every rank writes)
    COMPLETE.json       completion marker written last: the sha256 of every other file

A folder is valid only once its marker exists and every hash matches. On a local or shared file system the
folder is written under a temporary name, every file is fsynced, and the folder is renamed into place; on
object storage (any fsspec URL) the files are uploaded first, then the marker, then a small ``latest``
pointer. Loading goes through ``torch.load(weights_only=True)`` and safetensors only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.distributed import ProcessGroup

from largessl.dist.collectives import barrier, broadcast_object, get_world_size

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.pt"
META_FILE = "meta.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """``step-00000123`` for step 123 (zero-padded so names sort by step)."""
    return f"step-{step:08d}"


def rank_file(rank: int) -> str:
    """Name of a rank's private state file."""
    return f"rank-{rank:05d}.pt"


def _is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str | os.PathLike[str]) -> Path:
    p = str(path)
    return Path(p[len("file://"):] if p.startswith("file://") else p)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not every platform/filesystem allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def git_revision() -> str:
    """The git commit of the installed package's checkout, or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---------------------------------------------------------------------------------------------------
# RNG state (stored as tensors and primitives so weights_only loading accepts them)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------------
# Finding and verifying


@dataclass(frozen=True)
class _Listing:
    step: int
    path: str


def _list_steps(ckpt_dir: str) -> list[_Listing]:
    """Step folders under ``ckpt_dir``, newest first (no validation)."""
    if _is_remote(ckpt_dir):
        import fsspec

        fs, root = fsspec.core.url_to_fs(ckpt_dir)
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        base = ckpt_dir.rstrip("/")
    else:
        root_p = _local(ckpt_dir)
        if not root_p.is_dir():
            return []
        names = [p.name for p in root_p.iterdir() if p.is_dir()]
        base = str(root_p)
    out = []
    for n in names:
        m = _STEP_RE.match(n)
        if m:
            out.append(_Listing(int(m.group(1)), f"{base}/{n}"))
    return sorted(out, key=lambda x: x.step, reverse=True)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or a file does not match its recorded hash."""


def _read_bytes(path: str) -> bytes:
    if _is_remote(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    return _local(path).read_bytes()


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check the completion marker and every file hash; returns the marker, raises CorruptCheckpointError."""
    try:
        marker = json.loads(_read_bytes(f"{path}/{MARKER}"))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} has no completion marker {MARKER} (save interrupted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}/{MARKER} is not valid JSON: {e}") from None
    files = marker.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CorruptCheckpointError(f"{path}/{MARKER} does not list {MODEL_FILE}")
    for rel, digest in files.items():
        try:
            if _is_remote(path):
                actual = hashlib.sha256(_read_bytes(f"{path}/{rel}")).hexdigest()
            else:
                actual = _sha256_file(_local(path) / rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}/{rel} is missing") from None
        if actual != digest:
            raise CorruptCheckpointError(f"{path}/{rel} is corrupt (sha256 {actual[:12]}… != recorded {digest[:12]}…)")
    return marker


def find_latest_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str | None:
    """Newest complete, hash-verified checkpoint folder under ``ckpt_dir``; corrupt ones are reported and skipped."""
    for entry in _list_steps(str(ckpt_dir)):
        try:
            verify_checkpoint(entry.path)
        except CorruptCheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
            continue
        return entry.path
    return None


def _torch_load(path: str) -> Any:
    data = _read_bytes(path)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Rank-0 training state of a verified checkpoint folder (optimizer, scheduler, scaler, step, epoch, extra)."""
    path = str(path)
    verify_checkpoint(path)
    state = _torch_load(f"{path}/{TRAINING_FILE}")
    state["meta"] = json.loads(_read_bytes(f"{path}/{META_FILE}"))
    return state


def load_rank_state(path: str | os.PathLike[str], rank: int) -> dict[str, Any]:
    """A rank's private state (RNG states, data position) from a checkpoint folder."""
    return _torch_load(f"{path}/{rank_file(rank)}")


def load_model_state(path_or_run_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(method-module state_dict, resolved config dict, meta) from a step folder, a checkpoint dir or a run dir."""
    p = str(path_or_run_dir).rstrip("/")
    ckpt = _resolve_checkpoint(p)
    verify_checkpoint(ckpt)
    if _is_remote(ckpt):
        from safetensors.torch import load as load_bytes

        state = load_bytes(_read_bytes(f"{ckpt}/{MODEL_FILE}"))
    else:
        state = load_safetensors(str(_local(ckpt) / MODEL_FILE))
    meta = json.loads(_read_bytes(f"{ckpt}/{META_FILE}"))
    config = meta.pop("config", {})
    meta["path"] = ckpt
    return state, config, meta


def _resolve_checkpoint(p: str) -> str:
    def exists(path: str) -> bool:
        if _is_remote(path):
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            return fs.exists(root)
        return _local(path).exists()

    if exists(f"{p}/{MARKER}"):
        return p
    for candidate in (f"{p}/checkpoints", p):
        found = find_latest_checkpoint(candidate)
        if found:
            return found
    raise ValueError(f"no complete checkpoint found at {p} (looked for a step-N/ folder with {MARKER}); "
                     "pass a run directory, its checkpoints/ folder or a step-N/ folder")


# ---------------------------------------------------------------------------------------------------
# Saving


@dataclass
class SavePayload:
    """What one rank contributes to a checkpoint."""

    rank_state: dict[str, Any]
    """This rank's RNG states and data position."""
    model_state: dict[str, torch.Tensor] | None = None
    """Consolidated method-module state_dict (rank 0 only)."""
    training_state: dict[str, Any] | None = None
    """Optimizer, scheduler, scaler, step, epoch, extra (rank 0 only)."""
    meta: dict[str, Any] | None = None
    """JSON-serialisable step, epoch, git revision, metrics, config (rank 0 only)."""
    write_extra: Callable[[Path], None] | None = None
    """Called on every rank with the staging folder (DeepSpeed's save_checkpoint writes there)."""


class CheckpointManager:
    """Writes ``step-N/`` folders atomically from all ranks, keeps the newest ``keep`` and finds the latest."""

    def __init__(self, ckpt_dir: str, keep: int = 2, rank: int = 0, group: ProcessGroup | None = None) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (got {keep}): the previous checkpoint is the fallback")
        self.dir = ckpt_dir.rstrip("/")
        self.remote = _is_remote(self.dir)
        self.keep = keep
        self.rank = rank
        self.group = group
        if not self.remote:
            _local(self.dir).mkdir(parents=True, exist_ok=True)

    def latest(self) -> str | None:
        """Newest verified checkpoint, decided on rank 0 and broadcast so every rank resumes from the same one."""
        found = find_latest_checkpoint(self.dir) if self.rank == 0 else None
        return broadcast_object(found, 0, self.group)  # type: ignore[return-value]

    def save(self, step: int, payload: SavePayload) -> str:
        """Collective: every rank calls this with its payload; returns the final folder path."""
        name = step_dir_name(step)
        if self.remote:
            # Every rank stages privately and uploads its own files; only hashes travel between ranks.
            staging = Path(tempfile.mkdtemp(prefix=f"largessl-{name}-r{self.rank}-"))
        else:
            staging = _local(self.dir) / f".tmp-{name}"
            if self.rank == 0:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
            barrier(self.group)
        hashes = self._write_rank_files(staging, payload)
        if self.remote:
            self._upload(staging, name, hashes)
            shutil.rmtree(staging, ignore_errors=True)
        all_hashes: dict[str, str] = {}
        for src in range(get_world_size(self.group)):
            all_hashes.update(broadcast_object(hashes, src, self.group))  # type: ignore[arg-type]
        if self.rank == 0:
            if not self.remote:  # the broadcasts above ordered this after every rank's writes
                for p in sorted((staging / "deepspeed").rglob("*")):
                    if p.is_file():
                        _fsync_file(p)
                        all_hashes[p.relative_to(staging).as_posix()] = _sha256_file(p)
            self._finalise(staging, name, all_hashes)
            self._prune()
        barrier(self.group)
        return f"{self.dir}/{name}"

    def _write_rank_files(self, staging: Path, payload: SavePayload) -> dict[str, str]:
        """Write this rank's files, fsync them, and return their sha256 by relative path."""
        written = [staging / rank_file(self.rank)]
        torch.save(payload.rank_state, written[0])
        if payload.write_extra is not None:
            payload.write_extra(staging)
            # In a private (remote) staging folder every extra file is this rank's; in the shared folder
            # rank 0 hashes the extra files after all ranks finished (see save), never while they are written.
            if self.remote:
                written += [p for p in (staging / "deepspeed").rglob("*") if p.is_file()]
        if self.rank == 0:
            if payload.model_state is None or payload.training_state is None or payload.meta is None:
                raise AssertionError("rank 0 must provide model_state, training_state and meta")
            tensors = {k: v.detach().cpu().contiguous() for k, v in payload.model_state.items()}
            save_safetensors(tensors, str(staging / MODEL_FILE))
            torch.save(payload.training_state, staging / TRAINING_FILE)
            (staging / META_FILE).write_text(json.dumps(payload.meta, indent=1, sort_keys=True, default=str))
            written += [staging / MODEL_FILE, staging / TRAINING_FILE, staging / META_FILE]
        out = {}
        for p in written:
            _fsync_file(p)
            out[p.relative_to(staging).as_posix()] = _sha256_file(p)
        return out

    def _finalise(self, staging: Path, name: str, files: dict[str, str]) -> None:
        marker = {"step": int(name.split("-")[1]), "files": dict(sorted(files.items())),
                  "git_revision": git_revision()}
        text = json.dumps(marker, indent=1, sort_keys=True)
        if self.remote:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.dir)
            # Payload first (already uploaded by every rank), marker second, pointer last.
            fs.pipe_file(f"{root}/{name}/{MARKER}", text.encode())
            fs.pipe_file(f"{root}/{LATEST}", (name + "\n").encode())
        else:
            (staging / MARKER).write_text(text)
            _fsync_file(staging / MARKER)
            _fsync_dir(staging)
            root_p = _local(self.dir)
            final = root_p / name
            if final.exists():  # a re-save of the same step (e.g. a crash after the rename, before pruning)
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(root_p)
            tmp = root_p / f".{LATEST}.tmp"
            tmp.write_text(name + "\n")
            _fsync_file(tmp)
            os.replace(tmp, root_p / LATEST)
            _fsync_dir(root_p)
        log.info("checkpoint saved: %s/%s", self.dir, name)

    def _upload(self, staging: Path, name: str, files: dict[str, str]) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.dir)
        for rel in files:
            fs.put_file(str(staging / rel), f"{root}/{name}/{rel}")

    def _prune(self) -> None:
        """Delete complete checkpoints beyond the newest ``keep`` and leftovers of interrupted saves."""
        entries = _list_steps(self.dir)
        complete = []
        for e in entries:
            try:
                _read_bytes(f"{e.path}/{MARKER}")
                complete.append(e)
            except FileNotFoundError:
                continue
        for e in complete[self.keep:]:
            self._remove(e.path)
        if not self.remote:
            for p in _local(self.dir).glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)

    def _remove(self, path: str) -> None:
        log.debug("removing old checkpoint %s", path)
        if self.remote:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            fs.rm(root, recursive=True)
        else:
            shutil.rmtree(_local(path), ignore_errors=True)

    def cleanup_interrupted(self) -> None:
        """Remove staging folders left by a killed save (rank 0, before training starts)."""
        if self.rank == 0 and not self.remote:
            for p in _local(self.dir).glob(".tmp-step-*"):
                log.info("removing interrupted save %s", p)
                shutil.rmtree(p, ignore_errors=True)
