"""A checkpoint hub on any fsspec URL: immutable versions, index written last, sha256-verified pulls.

Layout under the hub root (a local directory, ``file://``, ``s3://bucket/prefix``, ...)::

    index.json                         every published version: card sha256, created time, summary
    index.html                         static overview for people (rewritten on every push)
    models/<name>/<version>/
        backbone.safetensors           torchvision ResNet state_dict without fc
        model_card.json                provenance, metrics and the sha256 + size of every other file
        checkpoint/...                 optional full training checkpoint

A version is published once it appears in ``index.json``; its folder is uploaded completely before the
index changes, so a crashed push leaves only an unlisted folder, which the next push of that version
replaces. The index records the card's sha256 and the card records every file's, so one chain of hashes
covers everything a pull writes. On a local hub the version folder is staged and renamed into place, the
index is replaced atomically and updates are serialised with a lock file; on object storage each PUT is
atomic but two concurrent pushes of *different* versions may race on the index (last writer wins; push
from one place, e.g. the pretraining job's last stage).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largessl.data.io import filesystem, protocol_of, storage_options_for, strip_protocol

log = logging.getLogger(__name__)

INDEX = "index.json"
INDEX_HTML = "index.html"
CARD = "model_card.json"
BACKBONE = "backbone.safetensors"
LATEST = "latest"
INDEX_FORMAT = "largessl-hub-index/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class IntegrityError(RuntimeError):
    """A hub file is missing, truncated or does not match its recorded sha256."""


def check_name(value: str, what: str = "name") -> str:
    """Model names and versions: letters, digits, '.', '_' and '-', not starting with a separator."""
    if not _NAME_RE.match(value or "") or value == LATEST or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' (e.g. bt-r50-in1k, v1); "
            f"'{LATEST}' is reserved for the newest version"
        )
    return value


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` or ``NAME@VERSION`` (``NAME`` and ``NAME@latest`` mean the newest version)."""

    name: str
    version: str = LATEST

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``bt-r50-in1k@v1``; the version defaults to ``latest``."""
        name, _, version = text.partition("@")
        check_name(name, "model name")
        if version and version != LATEST:
            check_name(version, "version")
        return cls(name, version or LATEST)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    """Current UTC time as ISO 8601 with a Z suffix (second precision)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


class Hub:
    """Push, list, show and pull model versions under one hub root URL."""

    def __init__(self, url: str = "hub", endpoint_url: str = "") -> None:
        if not url:
            raise ValueError("hub URL is empty; pass a directory or an fsspec URL such as s3://bucket/hub")
        self.url = url.rstrip("/") or "/"
        self.local = protocol_of(self.url) == "file"
        self.fs = filesystem(self.url, storage_options_for(self.url, endpoint_url))
        root = strip_protocol(self.url)
        self.root = str(Path(root).resolve()) if self.local else root

    # -- paths and raw I/O ------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def version_path(self, name: str, version: str) -> str:
        """Storage path of a version folder (no protocol)."""
        return self._path("models", name, version)

    def _read(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise RuntimeError(f"cannot read {path} from hub {self.url}: {e}") from e

    def _write(self, path: str, data: bytes) -> None:
        """Write one file; on a local hub via temp file + rename so readers never see half a file."""
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(path, data)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        """Serialise index updates of a local hub (object stores have no locks; see the module docstring)."""
        if not self.local:
            yield
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / ".index.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- index ------------------------------------------------------------------------------------

    def read_index(self) -> dict[str, Any]:
        """The index (an empty one for a new hub)."""
        try:
            data = json.loads(self._read(self._path(INDEX)))
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "models": {}}
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{self.url}/{INDEX} is not valid JSON ({e}); restore it from a backup") from None
        if data.get("format") != INDEX_FORMAT or not isinstance(data.get("models"), dict):
            raise IntegrityError(f"{self.url}/{INDEX} is not a largessl hub index (format {data.get('format')!r})")
        return data

    def resolve(self, ref: str | ModelRef) -> tuple[str, str, dict[str, Any]]:
        """(name, version, index entry) of a published version; ``latest`` picks the newest push."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        models = self.read_index()["models"]
        if ref.name not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ValueError(f"model {ref.name!r} is not in hub {self.url}; published models: {known}")
        entry = models[ref.name]
        version = entry["latest"] if ref.version == LATEST else ref.version
        if version not in entry["versions"]:
            raise ValueError(f"{ref.name} has no version {version!r} in hub {self.url}; "
                             f"versions: {', '.join(entry['versions'])}")
        return ref.name, version, entry["versions"][version]

    def list(self) -> list[dict[str, Any]]:
        """One row per published version: name, version, created, latest flag and summary."""
        rows = []
        for name, entry in sorted(self.read_index()["models"].items()):
            for version, v in entry["versions"].items():
                rows.append({"name": name, "version": version, "created": v.get("created", ""),
                             "latest": version == entry["latest"], "summary": v.get("summary", {})})
        return rows

    # -- reading ----------------------------------------------------------------------------------

    def show(self, ref: str | ModelRef) -> dict[str, Any]:
        """The verified model card of a published version."""
        name, version, entry = self.resolve(ref)
        return self._card(name, version, entry)

    def _card(self, name: str, version: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        path = f"{self.version_path(name, version)}/{CARD}"
        try:
            raw = self._read(path)
        except FileNotFoundError:
            raise IntegrityError(f"{name}@{version}: {CARD} is missing from the hub") from None
        if sha256_bytes(raw) != entry["card_sha256"]:
            raise IntegrityError(f"{name}@{version}: {CARD} does not match the sha256 recorded in the index "
                                 "(tampered or truncated)")
        return json.loads(raw)

    def read_verified(self, ref: str | ModelRef, files: list[str] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(card, {relative path: bytes}) of a version, every file checked against the card's size and sha256."""
        name, version, entry = self.resolve(ref)
        card = self._card(name, version, entry)
        wanted = list(card["files"]) if files is None else files
        out = {}
        for rel in wanted:
            if rel not in card["files"]:
                raise ValueError(f"{name}@{version} has no file {rel!r}; files: {', '.join(card['files'])}")
            out[rel] = self._fetch_checked(name, version, rel, card["files"][rel])
        return card, out

    def _fetch_checked(self, name: str, version: str, rel: str, expected: Mapping[str, Any]) -> bytes:
        try:
            data = self._read(f"{self.version_path(name, version)}/{rel}")
        except FileNotFoundError:
            raise IntegrityError(f"{name}@{version}: {rel} is missing from the hub") from None
        if len(data) != expected["size"]:
            raise IntegrityError(f"{name}@{version}: {rel} has {len(data)} bytes, the card records "
                                 f"{expected['size']} (truncated or tampered)")
        if sha256_bytes(data) != expected["sha256"]:
            raise IntegrityError(f"{name}@{version}: {rel} does not match its sha256 (tampered)")
        return data

    def pull(self, ref: str | ModelRef, dest: str | os.PathLike[str]) -> Path:
        """Download a version into the local directory ``dest`` after verifying every file.

        Files land in a temporary folder next to ``dest`` that is renamed to ``dest`` only when every
        sha256 matched; on any mismatch nothing is written at ``dest``. ``dest`` must not exist or be empty.
        """
        dest = Path(dest).resolve()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ValueError(f"pull destination {dest} exists and is not an empty directory; choose a new path")
        name, version, entry = self.resolve(ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            card_raw = self._read(f"{self.version_path(name, version)}/{CARD}")
            if sha256_bytes(card_raw) != entry["card_sha256"]:
                raise IntegrityError(f"{name}@{version}: {CARD} does not match the sha256 recorded in the index")
            card = json.loads(card_raw)
            for rel, expected in card["files"].items():
                target = tmp / rel
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise IntegrityError(f"{name}@{version}: card lists a path outside the model folder: {rel}")
                target.parent.mkdir(parents=True, exist_ok=True)
                # one file in memory at a time; backbones are at most a few hundred MB
                target.write_bytes(self._fetch_checked(name, version, rel, expected))
            (tmp / CARD).write_bytes(card_raw)
            if dest.exists():
                dest.rmdir()  # empty by the check above
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("pulled %s@%s into %s (%d files verified)", name, version, dest, len(card["files"]))
        return dest

    # -- writing ----------------------------------------------------------------------------------

    def push(self, name: str, version: str, files: Mapping[str, str | os.PathLike[str]],
             card: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Publish local ``files`` ({relative path: local file}) with ``card`` as ``name@version``.

        Adds ``name``, ``version``, ``created`` and the sha256/size of every file to the card, uploads the
        files, then the card, then updates the index (last) and rewrites index.html. Returns the card.
        Pushing a version that is already published raises ``ValueError``: versions are immutable.
        """
        check_name(name, "model name")
        check_name(version, "version")
        if not files:
            raise ValueError("nothing to push: give at least the backbone weights")
        for rel in files:
            if rel == CARD or rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"invalid file name in a push: {rel!r}")
        card = dict(card)
        card.update(name=name, version=version, created=card.get("created") or utc_now())
        card["files"] = {rel: {"sha256": sha256_file(p), "size": os.path.getsize(p)} for rel, p in sorted(files.items())}
        card_raw = _json_bytes(card)
        entry = {"created": card["created"], "card_sha256": sha256_bytes(card_raw), "summary": dict(summary or {})}
        # a local hub holds the lock for the whole push, so an unlisted folder is always a crashed push's
        with self._index_lock():
            self._check_unpublished(name, version)
            self._upload_version(name, version, files, card_raw)
            index = self.read_index()
            models = index["models"]
            if version in models.get(name, {}).get("versions", {}):
                raise ValueError(f"{name}@{version} was published concurrently; versions are immutable")
            model = models.setdefault(name, {"versions": {}, "latest": version})
            model["versions"][version] = entry
            model["latest"] = version
            self._write(self._path(INDEX), _json_bytes(index))  # the index last: this publishes the version
        log.info("published %s@%s to %s", name, version, self.url)
        self.write_index_html(index)
        return card

    def exists(self, name: str, version: str) -> bool:
        """True when ``name@version`` is published."""
        return version in self.read_index()["models"].get(name, {}).get("versions", {})

    def _check_unpublished(self, name: str, version: str) -> None:
        if self.exists(name, version):
            raise ValueError(f"{name}@{version} already exists in hub {self.url}; versions are immutable, "
                             "push a new --version")

    def _upload_version(self, name: str, version: str, files: Mapping[str, str | os.PathLike[str]],
                        card_raw: bytes) -> None:
        final = self.version_path(name, version)
        if self.local:
            staging = Path(self._path("models", name, f".staging-{version}-{uuid.uuid4().hex[:8]}"))
            try:
                for rel, src in files.items():
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, staging / rel)
                (staging / CARD).write_bytes(card_raw)
                if Path(final).exists():
                    log.warning("removing unpublished leftovers of an interrupted push at %s", final)
                    shutil.rmtree(final)
                os.replace(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return
        if self.fs.exists(final):
            log.warning("removing unpublished leftovers of an interrupted push at %s", final)
            self.fs.rm(final, recursive=True)
        for rel, src in files.items():
            self.fs.put_file(str(src), f"{final}/{rel}")
        self.fs.pipe_file(f"{final}/{CARD}", card_raw)  # the card last: it vouches for the files above

    def write_index_html(self, index: Mapping[str, Any] | None = None) -> None:
        """Render index.html from the index (no other reads) and write it to the hub root."""
        from largessl.hub.index_html import render_index_html

        index = self.read_index() if index is None else index
        self._write(self._path(INDEX_HTML), render_index_html(index, hub_url=self.url).encode())
