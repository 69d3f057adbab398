"""Atomic, hash-verified training checkpoints: one ``step-N/`` folder per save, local or on object storage.

Layout of ``<ckpt_dir>/step-00000123/``::

    model.safetensors   consolidated state_dict of the method module (backbone.*, projector.*, ...), rank 0
    training.pt         optimizer, scheduler, scaler, step, epoch, extra state (rank 0; torch.save of tensors/primitives)
    meta.json           step, epoch, git revision, last metrics, resolved config (rank 0)
    rank-00001.pt       per-rank RNG states and data position (every rank)
    deepspeed/          DeepSpeed's own files (only with dist.strategy=deepspeed): the module states (shared),
                        one optimizer partition per rank (ZeRO-1/2) and their layout (zero_layout.json)
    COMPLETE.json       completion marker written last: the sha256 and size of every other file

**Writing.** Every rank writes its files into a private folder, hashing them as they are written, then
publishes them: on a local or shared file system it moves them into the shared staging folder
``.tmp-step-N/``, which rank 0 renames into place once every rank is done (every file fsynced); on object
storage (``s3://``, ``gs://``, any fsspec URL) it uploads them into ``step-N/``. Rank 0 then checks that
every file is there with its size, writes the marker, then a small ``latest`` pointer, and prunes. A
folder without a marker is an interrupted save: it is never loaded, and it is removed before the next
run writes anything (:meth:`CheckpointManager.cleanup_interrupted`). A full disk raises an ``OSError``
(ENOSPC) that names the path; the partial files of this rank are removed at once.

**Reading each byte once.** Rank 0 reads the marker and checks that every file exists with its recorded
size (a listing, no data). Every rank then streams only the files it loads -- the shared ones once and its
own -- hashing them as the bytes arrive, and the ranks agree that every hash matched before any state is
applied; a mismatch anywhere makes every rank fall back to the previous checkpoint. Deserialisation uses
safetensors and ``torch.load(weights_only=True)``. DeepSpeed looks for its files with a local glob, so the
DeepSpeed files a rank needs are streamed (and verified) into a local temporary folder (``TMPDIR``).

The S3 endpoint comes from ``checkpoint.endpoint_url``, else ``data.endpoint_url``, else the AWS_*
environment (see :func:`largessl.data.io.storage_options_for`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as _io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch.distributed import ProcessGroup

from largessl.data import io
from largessl.distributed.collectives import barrier, broadcast_object, get_world_size
from largessl.distributed.env import StallWatchdog
from largessl.run.durable import DISK_FULL, fsync_dir, fsync_file, storage_error

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.pt"
META_FILE = "meta.json"
LATEST = "latest"
MARKER_FORMAT = 2
"""1: hashes only; 2: hashes and sizes (a listing checks completeness without reading data)."""
_STEP_RE = re.compile(r"^step-(\d+)$")
_CHUNK = 4 << 20
_OBJECT_STORES = ("s3", "gs", "az", "abfs")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()






def git_revision() -> str:
    """The git commit of the installed package's checkout, or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---------------------------------------------------------------------------------------------------
# Storage errors


def disk_full(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory``'s volume cannot take 64 KiB more (probes with a real write)."""
    probe = Path(directory) / f".largessl-space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (64 << 10))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return False


def _write_file(path: Path, data: bytes | memoryview) -> tuple[str, int]:
    """Write, fsync and hash ``data``; storage failures name ``path``."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise storage_error(e, path) from e
    return hashlib.sha256(data).hexdigest(), len(data)


def _torch_bytes(obj: Any) -> memoryview:
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


# ---------------------------------------------------------------------------------------------------
# Where checkpoints live


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or a file does not match its recorded hash."""


class _Store:
    """A checkpoint root: a local directory or an fsspec URL opened with the configured endpoint."""

    def __init__(self, root: str | os.PathLike[str], endpoint_url: str = "") -> None:
        self.url = str(root).rstrip("/")
        self.remote = _is_remote(self.url)
        if self.remote:
            self.fs = io.filesystem(self.url, io.storage_options_for(self.url, endpoint_url))
            self.root = self.fs._strip_protocol(self.url).rstrip("/")  # the filesystem's own path form
        else:
            self.fs = None
            self.root = str(_local(self.url))

    def path(self, *parts: str) -> str:
        """Storage path (no protocol) for fsspec calls, or the local path."""
        return "/".join([self.root, *parts])

    def url_of(self, *parts: str) -> str:
        """The user-facing location (with the protocol), for messages and return values."""
        return "/".join([self.url, *parts])

    def list_steps(self) -> list[tuple[int, str]]:
        """(step, folder name) of every ``step-N`` folder, newest first (no validation)."""
        if self.remote:
            self.fs.invalidate_cache()  # s3fs caches listings; another run may have written since
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        else:
            root = Path(self.root)
            if not root.is_dir():
                return []
            names = [p.name for p in root.iterdir() if p.is_dir()]
        out = [(int(m.group(1)), n) for n in names if (m := _STEP_RE.match(n))]
        return sorted(out, reverse=True)

    def sizes(self, name: str) -> dict[str, int]:
        """Size of every file under folder ``name`` by relative path (one listing, no data read)."""
        prefix = self.path(name)
        if self.remote:
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}
            return {p[len(prefix) + 1:]: int(info.get("size") or 0) for p, info in found.items()
                    if info.get("type", "file") == "file" and p.startswith(prefix + "/")}
        base = Path(prefix)
        return {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def exists(self, *parts: str) -> bool:
        """True when the file or folder exists."""
        if self.remote:
            return self.fs.exists(self.path(*parts))
        return Path(self.path(*parts)).exists()

    def open(self, *parts: str) -> IO[bytes]:
        """Open a file for reading (streamed, never cached whole)."""
        if self.remote:
            return self.fs.open(self.path(*parts), "rb")
        return open(self.path(*parts), "rb")

    def read_bytes(self, *parts: str) -> bytes:
        """A small file's content (markers, pointers)."""
        with self.open(*parts) as f:
            return f.read()

    def remove(self, name: str) -> None:
        """Delete folder ``name`` and everything under it (missing is fine)."""
        if self.remote:
            try:
                self.fs.rm(self.path(name), recursive=True)
            except FileNotFoundError:
                pass
        else:
            shutil.rmtree(self.path(name), ignore_errors=True)

    def stream_verified(self, name: str, rel: str, digest: str | None, sink: Callable[[bytes], Any]) -> int:
        """Stream ``name/rel`` into ``sink`` while hashing it; raises CorruptCheckpointError on a mismatch."""
        h = hashlib.sha256()
        n = 0
        try:
            with self.open(name, rel) as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    sink(chunk)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{self.url_of(name, rel)} is missing") from None
        if digest is not None and h.hexdigest() != digest:
            raise CorruptCheckpointError(f"{self.url_of(name, rel)} is corrupt (sha256 {h.hexdigest()[:12]}… != "
                                         f"recorded {digest[:12]}…)")
        return n

    def read_verified(self, name: str, rel: str, digest: str | None) -> _io.BytesIO:
        """The verified content of ``name/rel`` in memory (read once)."""
        buf = _io.BytesIO()
        self.stream_verified(name, rel, digest, buf.write)
        buf.seek(0)
        return buf

    def copy_verified(self, name: str, rel: str, digest: str | None, dest: Path) -> None:
        """Stream ``name/rel`` into the local file ``dest`` while verifying it."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(dest, "wb") as out:
                self.stream_verified(name, rel, digest, out.write)
        except OSError as e:
            raise storage_error(e, dest) from e


def _read_marker(store: _Store, name: str) -> dict[str, Any]:
    try:
        marker = json.loads(store.read_bytes(name, MARKER))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{store.url_of(name)} has no completion marker {MARKER} "
                                     "(save interrupted)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{store.url_of(name, MARKER)} is not valid JSON: {e}") from None
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CorruptCheckpointError(f"{store.url_of(name, MARKER)} does not list {MODEL_FILE}")
    return marker


def _check_complete(store: _Store, name: str, marker: dict[str, Any], present: dict[str, int] | None = None) -> None:
    """Every file the marker lists exists with its recorded size (format 1 markers: exists)."""
    present = store.sizes(name) if present is None else present
    sizes = marker.get("sizes", {})
    for rel in marker["files"]:
        if rel not in present:
            raise CorruptCheckpointError(f"{store.url_of(name, rel)} is missing")
        if rel in sizes and present[rel] != int(sizes[rel]):
            raise CorruptCheckpointError(f"{store.url_of(name, rel)} has {present[rel]} bytes, the marker "
                                         f"records {sizes[rel]} (truncated or overwritten)")


def _candidates(store: _Store, below: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(folder name, marker) of every complete-looking checkpoint, newest first; others are reported."""
    for step, name in store.list_steps():
        if below is not None and step >= below:
            continue
        present = store.sizes(name)  # one listing: presence of the marker and every size, no data
        if not present:
            continue  # an empty prefix (some object stores keep a folder entry after its files are deleted)
        try:
            if MARKER not in present:
                raise CorruptCheckpointError(f"{store.url_of(name)} has no completion marker {MARKER} "
                                             "(save interrupted)")
            marker = _read_marker(store, name)
            _check_complete(store, name, marker, present)
        except CorruptCheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
            continue
        yield name, marker


def _split(path: str | os.PathLike[str], endpoint_url: str = "") -> tuple[_Store, str]:
    p = str(path).rstrip("/")
    parent, _, name = p.rpartition("/")
    return _Store(parent or ".", endpoint_url), name


def verify_checkpoint(path: str | os.PathLike[str], endpoint_url: str = "") -> dict[str, Any]:
    """Full check of one step folder: marker, sizes and every file's hash (reads everything); returns the marker.

    Resume and the loaders verify the files they read as they read them; this is for tools and tests.
    """
    store, name = _split(path, endpoint_url)
    marker = _read_marker(store, name)
    _check_complete(store, name, marker)
    for rel, digest in marker["files"].items():
        store.stream_verified(name, rel, digest, lambda chunk: None)
    return marker


def find_latest_checkpoint(ckpt_dir: str | os.PathLike[str], endpoint_url: str = "") -> str | None:
    """Newest checkpoint folder whose marker lists files that all exist with their sizes, or None.

    Content hashes are checked when the files are read (:func:`load_model_state`, resume), where a
    mismatch falls back to the previous checkpoint.
    """
    store = _Store(ckpt_dir, endpoint_url)
    for name, _ in _candidates(store):
        return store.url_of(name)
    return None


def _load_torch(buf: IO[bytes]) -> Any:
    return torch.load(buf, map_location="cpu", weights_only=True)


def load_training_checkpoint(path: str | os.PathLike[str], endpoint_url: str = "") -> dict[str, Any]:
    """Rank-0 training state of a checkpoint folder (optimizer, scheduler, scaler, step, epoch, extra, meta)."""
    store, name = _split(path, endpoint_url)
    files = _read_marker(store, name)["files"]
    state = _load_torch(store.read_verified(name, TRAINING_FILE, files.get(TRAINING_FILE)))
    state["meta"] = json.loads(store.read_verified(name, META_FILE, files.get(META_FILE)).getvalue())
    return state


def load_rank_state(path: str | os.PathLike[str], rank: int, endpoint_url: str = "") -> dict[str, Any]:
    """A rank's private state (RNG states, data position) from a checkpoint folder, hash-verified."""
    store, name = _split(path, endpoint_url)
    files = _read_marker(store, name)["files"]
    return _load_torch(store.read_verified(name, rank_file(rank), files.get(rank_file(rank))))


def load_model_state(path_or_run_dir: str | os.PathLike[str],
                     endpoint_url: str = "") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(method-module state_dict, resolved config dict, meta) from a step folder, a checkpoint dir or a run dir.

    Reads the marker, the weights and meta.json once each, verifying their hashes as they stream; for a
    checkpoint or run directory, a corrupt newest checkpoint falls back to the previous one.
    """
    p = str(path_or_run_dir).rstrip("/")
    explicit = _Store(p, endpoint_url).exists(MARKER)
    if explicit:
        store, name = _split(p, endpoint_url)
        candidates: Iterator[tuple[str, dict[str, Any]]] = iter([(name, _read_marker(store, name))])
    else:
        store = next((s for s in (_Store(f"{p}/checkpoints", endpoint_url), _Store(p, endpoint_url))
                      if s.list_steps()), _Store(p, endpoint_url))
        candidates = _candidates(store)
    for name, marker in candidates:
        files = marker["files"]
        try:
            weights = load_safetensors_bytes(store.read_verified(name, MODEL_FILE, files[MODEL_FILE]).getvalue())
            meta = json.loads(store.read_verified(name, META_FILE, files.get(META_FILE)).getvalue())
        except CorruptCheckpointError as e:
            if explicit:
                raise
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
            continue
        config = meta.pop("config", {})
        meta["path"] = store.url_of(name)
        return weights, config, meta
    raise ValueError(f"no complete checkpoint found at {p} (looked for a step-N/ folder with {MARKER}); "
                     "pass a run directory, its checkpoints/ folder or a step-N/ folder")


# ---------------------------------------------------------------------------------------------------
# Saving and resuming


MoreFiles = Callable[[Path, list[str]], Iterable[str]]
"""Chooses more files of a checkpoint to read, given the local folder of those read so far and every file the
marker lists (a DeepSpeed resume on another world size picks the optimizer partitions it needs)."""


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
    """Called on every rank with its private folder; every file it writes there is this rank's (DeepSpeed's
    save_checkpoint writes ``deepspeed/...``)."""


@dataclass
class LoadedCheckpoint:
    """What one rank read (and verified) of a checkpoint; :meth:`close` removes the local copies."""

    path: str
    """The step folder (URL for object storage)."""
    marker: dict[str, Any]
    """The completion marker (hashes and sizes of every file)."""
    training: dict[str, Any]
    """training.pt with ``meta`` (meta.json) added."""
    model: dict[str, torch.Tensor] | None
    """model.safetensors, when it was asked for."""
    rank_state: dict[str, Any]
    """This rank's private state (rank 0's when the saving run had fewer ranks)."""
    extra_dir: Path | None = None
    """Local folder holding the extra files this rank needs (``deepspeed/...``), verified."""
    _store: _Store | None = field(default=None, repr=False)
    _name: str = field(default="", repr=False)

    def read_rank_state(self, rank: int) -> dict[str, Any]:
        """Another rank's private state file, read and verified on demand."""
        assert self._store is not None
        rel = rank_file(rank)
        if rel not in self.marker["files"]:
            raise ValueError(f"checkpoint {self.path} has no state of rank {rank} (it was saved by "
                             f"{saved_world_size(self.marker)} rank(s))")
        return _load_torch(self._store.read_verified(self._name, rel, self.marker["files"][rel]))

    def close(self) -> None:
        """Remove the local copies of the extra files."""
        if self.extra_dir is not None:
            shutil.rmtree(self.extra_dir, ignore_errors=True)
            self.extra_dir = None


def saved_world_size(marker: dict[str, Any]) -> int:
    """Number of ranks that wrote a checkpoint (its rank-N.pt files)."""
    return sum(1 for rel in marker["files"] if re.fullmatch(r"rank-\d+\.pt", rel))


class CheckpointManager:
    """Writes ``step-N/`` folders atomically from all ranks, keeps the newest ``keep``, and resumes reading
    each byte once. Every public method except :meth:`cleanup_interrupted` is a collective."""

    def __init__(self, ckpt_dir: str, keep: int = 2, rank: int = 0, group: ProcessGroup | None = None,
                 endpoint_url: str = "") -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (got {keep}): the previous checkpoint is the fallback")
        self.store = _Store(ckpt_dir, endpoint_url)
        self.dir = self.store.url
        self.remote = self.store.remote
        self.keep = keep
        self.rank = rank
        self.group = group
        self.watchdog: StallWatchdog | None = None
        """Paused while checkpoints are read or written (their bounds are the storage's and the collectives')."""
        self.scratch_tag = hashlib.sha256(self.store.url.encode()).hexdigest()[:12]
        """Names this checkpoint directory's local scratch folders under TMPDIR (see :meth:`_local_scratch`)."""
        if not self.remote:
            try:
                Path(self.store.root).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise storage_error(e, self.store.root) from e
        self.cleanup_scratch()

    # -------------------------------------------------------------------------------------------
    # local scratch (TMPDIR): a rank's share of a remote save, DeepSpeed files of a load

    def _local_scratch(self, kind: str, name: str) -> Path:
        """A fresh private folder under TMPDIR, named after this checkpoint directory, the rank and the pid, so
        that a later run finds what a killed process left (:meth:`cleanup_scratch`)."""
        return Path(tempfile.mkdtemp(prefix=f"largessl-{kind}-{self.scratch_tag}-r{self.rank:05d}-p{os.getpid()}-"
                                            f"{name}-"))

    def cleanup_scratch(self) -> list[str]:
        """Every rank: remove scratch folders of this checkpoint directory whose process is gone (a SIGKILLed
        save leaves its share of a remote checkpoint in TMPDIR). Folders of live processes are left alone."""
        removed = []
        pattern = re.compile(rf"^largessl-(?:save|load)-{self.scratch_tag}-r\d+-p(\d+)-")
        try:
            entries = list(Path(tempfile.gettempdir()).iterdir())
        except OSError:
            return removed
        for p in entries:
            m = pattern.match(p.name)
            if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
            log.info("removed %s, left in TMPDIR by a process that ended during a save or load", p)
        return removed

    # -------------------------------------------------------------------------------------------
    # finding and loading

    def latest(self) -> str | None:
        """Newest complete checkpoint (marker and sizes), decided on rank 0 and broadcast to every rank."""
        found = next((self.store.url_of(n) for n, _ in _candidates(self.store)), None) if self.rank == 0 else None
        return broadcast_object(found, 0, self.group)  # type: ignore[return-value]

    def _io(self) -> contextlib.AbstractContextManager[None]:
        return self.watchdog.paused() if self.watchdog is not None else contextlib.nullcontext()

    def load(self, *, read_model: bool = True, extra_files: Callable[[str], bool] | None = None,
             more_files: MoreFiles | None = None, state_of_rank: int | None = None) -> LoadedCheckpoint | None:
        """Collective: read the newest verified checkpoint, each rank only the files it needs, each byte once.

        Rank 0 picks the candidate from the markers and sizes; every rank streams training.pt, meta.json,
        model.safetensors (``read_model``), its rank file (``state_of_rank``; default its own, or rank 0's
        when the saving run had fewer ranks) and the files ``extra_files`` selects, then those ``more_files``
        picks after reading them (``more_files(local_dir, every_listed_file)``), into a local folder,
        verifying hashes as it reads. Only when every rank verified everything is the result returned;
        a corrupt file anywhere makes all ranks move on to the previous checkpoint. None when there is none.
        """
        with self._io():
            return self._load(read_model, extra_files, more_files, state_of_rank)

    def _load(self, read_model: bool, extra_files: Callable[[str], bool] | None, more_files: MoreFiles | None,
              state_of_rank: int | None) -> LoadedCheckpoint | None:
        below: int | None = None
        while True:
            cand = None
            if self.rank == 0:
                cand = next(_candidates(self.store, below), None)
            cand = broadcast_object(cand, 0, self.group)
            if cand is None:
                return None
            name, marker = cand  # type: ignore[misc]
            loaded: LoadedCheckpoint | None = None
            error: tuple[str, str] | None = None
            raised: BaseException | None = None
            try:
                loaded = self._read(name, marker, read_model, extra_files, more_files, state_of_rank)
            except CorruptCheckpointError as e:
                error = ("corrupt", str(e))
            except Exception as e:  # reported to every rank so none is left waiting in the agreement
                error, raised = ("error", f"{type(e).__name__}: {e}"), e
            errors = [broadcast_object(error, src, self.group) for src in range(get_world_size(self.group))]
            if all(e is None for e in errors):
                assert loaded is not None
                return loaded
            if loaded is not None:
                loaded.close()
            failed = [(r, e) for r, e in enumerate(errors) if e is not None and e[0] == "error"]
            if raised is not None:
                raise raised
            if failed:
                r, (_, msg) = failed[0]
                raise RuntimeError(f"rank {r} could not read checkpoint {self.store.url_of(name)}: {msg}")
            for r, e in enumerate(errors):
                if e is not None:
                    log.warning("checkpoint %s failed verification on rank %d: %s; falling back to the previous "
                                "one", self.store.url_of(name), r, e[1])
                    break
            below = int(marker["step"]) if "step" in marker else int(name.split("-")[1])

    def _read(self, name: str, marker: dict[str, Any], read_model: bool, extra_files: Callable[[str], bool] | None,
              more_files: MoreFiles | None, state_of_rank: int | None) -> LoadedCheckpoint:
        files: dict[str, str] = marker["files"]
        store = self.store
        if state_of_rank is None:
            state_of_rank = self.rank if rank_file(self.rank) in files else 0
        for rel in (TRAINING_FILE, META_FILE, rank_file(state_of_rank)):
            if rel not in files:
                raise CorruptCheckpointError(f"{store.url_of(name, MARKER)} does not list {rel}")
        training = _load_torch(store.read_verified(name, TRAINING_FILE, files[TRAINING_FILE]))
        training["meta"] = json.loads(store.read_verified(name, META_FILE, files[META_FILE]).getvalue())
        model = None
        if read_model:
            model = load_safetensors_bytes(store.read_verified(name, MODEL_FILE, files[MODEL_FILE]).getvalue())
        rank_state = _load_torch(store.read_verified(name, rank_file(state_of_rank), files[rank_file(state_of_rank)]))
        loaded = LoadedCheckpoint(store.url_of(name), marker, training, model, rank_state, None, store, name)
        if extra_files is not None:
            wanted = sorted(rel for rel in files if extra_files(rel))
            loaded.extra_dir = self._local_scratch("load", name)
            try:
                for rel in wanted:
                    store.copy_verified(name, rel, files[rel], loaded.extra_dir / rel)
                if more_files is not None:
                    # inside the read, so a corrupt file here falls back to the previous checkpoint like any other
                    for rel in sorted(set(more_files(loaded.extra_dir, sorted(files))) - set(wanted)):
                        if rel not in files:
                            raise CorruptCheckpointError(f"{store.url_of(name, MARKER)} does not list {rel}")
                        store.copy_verified(name, rel, files[rel], loaded.extra_dir / rel)
            except BaseException:
                loaded.close()
                raise
        return loaded

    # -------------------------------------------------------------------------------------------
    # saving

    def save(self, step: int, payload: SavePayload) -> str:
        """Collective: every rank calls this with its payload; returns the final folder path."""
        with self._io():
            return self._save(step, payload)

    def _save(self, step: int, payload: SavePayload) -> str:
        name = step_dir_name(step)
        staging = self._prepare(name)
        if staging is not None:
            private = staging / f".rank-{self.rank:05d}"
            private.mkdir(parents=True, exist_ok=True)
        else:
            private = self._local_scratch("save", name)
        try:
            files = self._write_rank_files(private, payload)
            self._publish(private, staging, name, files)
        except BaseException:
            if self.rank == 0:
                self._abandon(staging, name)
            raise
        finally:
            # frees the space at once when the disk filled up; the next run removes whatever is left
            shutil.rmtree(private, ignore_errors=True)
        all_files: dict[str, tuple[str, int]] = {}
        for src in range(get_world_size(self.group)):
            all_files.update(broadcast_object(files, src, self.group))  # type: ignore[arg-type]
        if self.rank == 0:
            try:
                # Everything that must hold before the folder becomes a checkpoint is checked here, before the
                # marker; a failure abandons the save and the previous checkpoint stays the latest.
                self._check_published(staging, name, all_files)
                self._finalise(staging, name, all_files)
            except BaseException:
                self._abandon(staging, name)
                raise
            self._prune(step)
        barrier(self.group)
        return self.store.url_of(name)

    def _prepare(self, name: str) -> Path | None:
        """Rank 0 readies the destination; returns the shared local staging folder (None on object storage)."""
        staging = Path(self.store.path(f".tmp-{name}")) if not self.remote else None
        if self.rank == 0:
            try:
                if staging is not None:
                    if staging.exists():
                        shutil.rmtree(staging)
                    staging.mkdir(parents=True)
                elif self.store.exists(name, MARKER):
                    # a re-save of the same step: invalidate the folder before any file is replaced
                    self.store.fs.rm(self.store.path(name, MARKER))
            except OSError as e:
                raise storage_error(e, staging or self.store.url_of(name)) from e
        barrier(self.group)
        return staging

    def _write_rank_files(self, private: Path, payload: SavePayload) -> dict[str, tuple[str, int]]:
        """Write this rank's files into its private folder; returns (sha256, size) by relative path."""
        out: dict[str, tuple[str, int]] = {}
        if payload.write_extra is not None:
            try:
                payload.write_extra(private)
            except OSError as e:
                raise storage_error(e, private) from e
            except Exception as e:
                # DeepSpeed's torch.save reports a full disk as a RuntimeError ("unexpected pos ...")
                if disk_full(private):
                    raise OSError(errno.ENOSPC, DISK_FULL, str(private)) from e
                raise
            for p in sorted(private.rglob("*")):
                if p.is_file():
                    fsync_file(p)
                    out[p.relative_to(private).as_posix()] = (_sha256_file(p), p.stat().st_size)
        out[rank_file(self.rank)] = _write_file(private / rank_file(self.rank), _torch_bytes(payload.rank_state))
        if self.rank == 0:
            if payload.model_state is None or payload.training_state is None or payload.meta is None:
                raise AssertionError("rank 0 must provide model_state, training_state and meta")
            tensors = {k: v.detach().cpu().contiguous() for k, v in payload.model_state.items()}
            out[MODEL_FILE] = _write_file(private / MODEL_FILE, save_safetensors_bytes(tensors))
            out[TRAINING_FILE] = _write_file(private / TRAINING_FILE, _torch_bytes(payload.training_state))
            meta = json.dumps(payload.meta, indent=1, sort_keys=True, default=str).encode()
            out[META_FILE] = _write_file(private / META_FILE, meta)
        return out

    def _publish(self, private: Path, staging: Path | None, name: str, files: dict[str, tuple[str, int]]) -> None:
        """Move this rank's files into the shared staging folder, or upload them into ``step-N/``."""
        if staging is None and io.protocol_of(self.store.url) not in _OBJECT_STORES:
            # object stores have no folders (s3fs's makedirs would even create a missing bucket); others need them
            for parent in sorted({self.store.path(name, rel).rsplit("/", 1)[0] for rel in files}):
                self.store.fs.makedirs(parent, exist_ok=True)
        for rel in files:
            src = private / rel
            if staging is not None:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
            else:
                self.store.fs.put_file(str(src), self.store.path(name, rel))

    def _check_published(self, staging: Path | None, name: str, files: dict[str, tuple[str, int]]) -> None:
        """Every rank's file is in place with its size before the marker makes the folder valid."""
        if staging is not None:
            present = {rel: (staging / rel).stat().st_size for rel in files if (staging / rel).is_file()}
        else:
            present = self.store.sizes(name)
        for rel, (_, size) in sorted(files.items()):
            if present.get(rel) != size:
                raise OSError(errno.EIO, f"checkpoint file has {present.get(rel, 'no')} bytes after the upload, "
                              f"expected {size}; the save is abandoned", self.store.url_of(name, rel))

    def _finalise(self, staging: Path | None, name: str, files: dict[str, tuple[str, int]]) -> None:
        marker = {"format": MARKER_FORMAT, "step": int(name.split("-")[1]),
                  "files": {rel: files[rel][0] for rel in sorted(files)},
                  "sizes": {rel: files[rel][1] for rel in sorted(files)},
                  "git_revision": git_revision()}
        text = json.dumps(marker, indent=1, sort_keys=True).encode()
        if staging is None:
            # Payload first (already uploaded by every rank), marker second, pointer last.
            self.store.fs.pipe_file(self.store.path(name, MARKER), text)
            self.store.fs.pipe_file(self.store.path(LATEST), (name + "\n").encode())
        else:
            root = Path(self.store.root)
            _write_file(staging / MARKER, text)
            for d in sorted({(staging / rel).parent for rel in files} | {staging}, reverse=True):
                fsync_dir(d)
            final = root / name
            if final.exists():  # a re-save of the same step (e.g. a crash after the rename, before pruning)
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_dir(root)
            tmp = root / f".{LATEST}.tmp"
            _write_file(tmp, (name + "\n").encode())
            os.replace(tmp, root / LATEST)
            fsync_dir(root)
        log.info("checkpoint saved: %s", self.store.url_of(name))

    def _abandon(self, staging: Path | None, name: str) -> None:
        """Rank 0, after a failed save: remove what it left (best effort; the next start cleans up the rest)."""
        try:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            elif not self.store.exists(name, MARKER):
                self.store.remove(name)
        except Exception as e:  # the original failure matters more than this one
            log.warning("could not remove the failed save %s: %s", self.store.url_of(name), e)

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints up to step ``newest`` (the one just written and checked,
        so the newest verified checkpoint is never dropped) and remove interrupted saves older than it."""
        kept = 0
        for step, name in self.store.list_steps():
            if step > newest:
                continue  # not this run's: an older timeline's checkpoint that failed verification at resume
            complete = step == newest or self.store.exists(name, MARKER)
            if complete and kept < self.keep:
                kept += 1
                continue
            log.debug("removing %s checkpoint %s", "old" if complete else "interrupted", self.store.url_of(name))
            self.store.remove(name)
        if not self.remote:
            for p in Path(self.store.root).glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)

    def set_aside_unverified(self) -> list[str]:
        """Rank 0, when a run restarts from scratch because no checkpoint verified: rename every ``step-N`` folder
        to ``unverified-step-N`` (kept for inspection, never loaded or pruned); returns the new locations."""
        moved = []
        for _, name in self.store.list_steps():
            dest = f"unverified-{name}"
            if self.store.exists(dest):
                dest = f"{dest}-{int(time.time())}"
            try:
                if self.remote:
                    self.store.fs.mv(self.store.path(name), self.store.path(dest), recursive=True)
                else:
                    os.replace(self.store.path(name), self.store.path(dest))
            except OSError as e:
                raise storage_error(e, self.store.url_of(name)) from e
            moved.append(self.store.url_of(dest))
            log.warning("set aside %s as %s (it failed verification)", self.store.url_of(name), self.store.url_of(dest))
        return moved

    def cleanup_interrupted(self) -> list[str]:
        """Rank 0, before the run writes anything: remove what killed or failed saves left behind.

        Local: ``.tmp-step-N`` staging folders. Object storage: ``step-N/`` folders without a marker
        (uploads cut short). Returns what was removed. Other ranks do nothing.
        """
        if self.rank != 0:
            return []
        removed = []
        if self.remote:
            for _, name in self.store.list_steps():
                present = self.store.sizes(name)
                if MARKER not in present:
                    if present:  # empty prefixes are left-overs of deletes, not saves
                        removed.append(self.store.url_of(name))
                    self.store.remove(name)
        else:
            root = Path(self.store.root)
            for p in sorted(root.glob(".tmp-step-*")) if root.is_dir() else []:
                removed.append(str(p))
                shutil.rmtree(p, ignore_errors=True)
        for r in removed:
            log.info("removed interrupted save %s", r)
        return removed
