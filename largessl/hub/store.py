"""A checkpoint hub on a directory or S3: immutable versions, safe concurrent publishing, verified pulls.

Layout under the hub root (a local directory, ``file://``, ``s3://bucket/prefix``)::

    index.json                  every published version: where it is, card sha256, created, summary, yank
    index.html, pages/<name>.html   static pages for people (rewritten after every push and yank)
    models/<name>/<version>/                      a local hub's version folder
    models/<name>/<version>/<push id>/            an object-store hub's version folder (one per push attempt)
        backbone.safetensors    torchvision ResNet state_dict without fc
        model_card.json         provenance, metrics and the sha256 + size of every other file
        checkpoint/...          optional full training checkpoint, pickle-free (safetensors + JSON)
    claims/<name>/<version>.json  object stores: which push is uploading that version, until when (a lease)

Publishing protocol (docs/hub.md explains the choices):

1. A version's files and then its card are uploaded where no other push writes (a local staging folder
   renamed into place under the hub lock; on S3 a prefix named by this push's random id).
2. The version becomes visible in one compare-and-swap of ``index.json`` (local: under an ``flock``; S3:
   ``PutObject`` with ``If-Match``/``If-None-Match``), which re-reads the index on conflict, so no
   concurrent commit is lost, and refuses if the version is already listed, so a version is written once.
3. On S3 a push first creates ``claims/<name>/<version>.json`` with ``If-None-Match: *``, so a second push of
   the same version fails at once instead of after uploading gigabytes. The claim is a lease renewed while
   the upload runs; a crashed push's claim expires and the next push takes it over with ``If-Match``.
   Correctness never depends on the lease: the index swap in step 2 is the fence.

Readers only follow the index, whose entries point at complete folders, so nobody sees half a version.
The index records the card's sha256 and the card every file's: one chain of hashes covers a pull.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from largessl.data.io import filesystem, protocol_of, storage_options_for, strip_protocol
from largessl.hub.pages import model_page_name, render_index_html, render_model_page
from largessl.hub.pickle_free import is_pickle_bytes, is_pickle_file
from largessl.hub.records import (
    CARD,
    CLAIMS_DIR,
    INDEX,
    INDEX_FORMAT,
    INDEX_HTML,
    LATEST,
    PAGES_DIR,
    READABLE_INDEX_FORMATS,
    ModelRef,
    check_name,
    latest_version,
    rehome_snippets,
    version_order,
)
from largessl.hub.storage import LocalStorage, PlainStorage, S3Storage, Storage

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 600.0
"""How long a push's claim on a version lasts without renewal (renewed every third of it while uploading)."""
_COMMIT_ATTEMPTS = 64
class IntegrityError(RuntimeError):
    """A hub file is missing, truncated or does not match its recorded sha256."""


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


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


class _Lease:
    """A claim object kept alive by a background thread; ``lost`` once someone else holds it."""

    def __init__(self, storage: Storage, rel: str, body: dict[str, Any], token: str, lease_s: float) -> None:
        self.storage, self.rel, self.body, self.token, self.lease_s = storage, rel, body, token, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="hub-claim-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            body = dict(self.body, expires=time.time() + self.lease_s)
            try:
                token = self.storage.write_if(self.rel, _json_bytes(body), self.token)
            except RuntimeError as e:  # a transient store error: the next renewal retries
                log.warning("could not renew the claim %s: %s", self.rel, e)
                continue
            if token is None:
                self.lost = True
                log.error("lost the claim %s to another push (this push's lease had expired)", self.rel)
                return
            self.token = token

    def stop(self) -> None:
        """Stop renewing (the claim object stays until :meth:`Hub._release` deletes it)."""
        self._stop.set()
        self._thread.join(timeout=30)


class Hub:
    """Push, list, show, pull and yank model versions under one hub root URL.

    ``single_writer=True`` allows writes to stores without compare-and-swap (gs://, memory://, an S3 store
    that ignores conditional headers) when only one process ever writes. ``lease_s`` is the claim lease of
    object-store pushes.
    """

    def __init__(self, url: str = "hub", endpoint_url: str = "", *, single_writer: bool = False,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        if not url:
            raise ValueError("hub URL is empty; pass a directory or an fsspec URL such as s3://bucket/hub")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0 seconds (got {lease_s})")
        self.url = url.rstrip("/") or "/"
        self.local = protocol_of(self.url) == "file"
        self.lease_s = float(lease_s)
        root = strip_protocol(self.url)
        if self.local:
            self.root = str(Path(root).resolve())
            self.fs = None
            self.storage: Storage = LocalStorage(self.root)
        else:
            opts = storage_options_for(self.url, endpoint_url)
            self.fs = filesystem(self.url, opts)
            self.root = root.rstrip("/")
            if protocol_of(self.url) == "s3":
                self.storage = S3Storage(self.url, self.fs, self.root, opts, single_writer)
            else:
                self.storage = PlainStorage(self.url, self.fs, self.root, single_writer)

    # -- raw reads --------------------------------------------------------------------------------

    def _read(self, rel: str) -> bytes:
        try:
            return self.storage.read(rel)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise RuntimeError(f"cannot read {rel} from hub {self.url}: {e}") from e

    def entry_path(self, name: str, version: str, entry: Mapping[str, Any]) -> str:
        """Folder of a version relative to the hub root (format-1 entries have none: models/NAME/VERSION)."""
        return str(entry.get("path") or f"models/{name}/{version}")

    def version_path(self, name: str, version: str) -> str:
        """Storage path of a published version's folder (no protocol)."""
        name, version, entry = self.resolve(ModelRef(name, version))
        return f"{self.root}/{self.entry_path(name, version, entry)}"

    # -- index ------------------------------------------------------------------------------------

    def _parse_index(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {"format": INDEX_FORMAT, "models": {}, "seq": 0}
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{self.url}/{INDEX} is not valid JSON ({e}); restore it from a backup") from None
        if not isinstance(data, dict) or data.get("format") not in READABLE_INDEX_FORMATS \
                or not isinstance(data.get("models"), dict):
            fmt = data.get("format") if isinstance(data, dict) else None
            raise IntegrityError(f"{self.url}/{INDEX} is not a largessl hub index (format {fmt!r}); a newer "
                                 "largessl may have written it")
        return data

    def read_index(self) -> dict[str, Any]:
        """The index (an empty one for a new hub)."""
        try:
            raw, _ = self.storage.read_versioned(INDEX)
        except OSError as e:
            raise RuntimeError(f"cannot read {INDEX} from hub {self.url}: {e}") from e
        return self._parse_index(raw)

    def resolve(self, ref: str | ModelRef) -> tuple[str, str, dict[str, Any]]:
        """(name, version, index entry); ``latest`` is the newest version that is not yanked."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        models = self.read_index()["models"]
        if ref.name not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ValueError(f"model {ref.name!r} is not in hub {self.url}; published models: {known}")
        model = models[ref.name]
        if ref.version == LATEST:
            version = latest_version(model)
            if version is None:
                raise ValueError(f"every version of {ref.name} in hub {self.url} is yanked "
                                 f"({', '.join(sorted(model['versions']))}); name one explicitly "
                                 f"(NAME@VERSION) and allow yanked versions to use it anyway")
        else:
            version = ref.version
        if version not in model["versions"]:
            raise ValueError(f"{ref.name} has no version {version!r} in hub {self.url}; "
                             f"versions: {', '.join(sorted(model['versions']))}")
        return ref.name, version, model["versions"][version]

    def check_yanked(self, name: str, version: str, entry: Mapping[str, Any], allow_yanked: bool) -> None:
        """Refuse a yanked version (ValueError), or warn when ``allow_yanked``."""
        y = entry.get("yanked")
        if not y:
            return
        text = f"{name}@{version} was yanked on {y.get('at', '?')}: {y.get('reason', '')}"
        if not allow_yanked:
            latest = latest_version(self.read_index()["models"].get(name, {}))
            alt = f"the latest good version is {name}@{latest}" if latest else "no version of it is unyanked"
            raise ValueError(f"{text}. It is kept for reproducibility but should not be used ({alt}); "
                             "pass --allow-yanked (allow_yanked=True) to use it anyway")
        log.warning("%s (using it because yanked versions were allowed)", text)

    def list(self) -> list[dict[str, Any]]:
        """One row per published version: name, version, created, latest and yanked flags, summary."""
        rows = []
        for name, model in sorted(self.read_index()["models"].items()):
            latest = latest_version(model)
            for version, v in sorted(model["versions"].items(), key=lambda kv: version_order(kv[1])):
                rows.append({"name": name, "version": version, "created": v.get("created", ""),
                             "latest": version == latest, "yanked": v.get("yanked"),
                             "summary": v.get("summary", {})})
        return rows

    def exists(self, name: str, version: str) -> bool:
        """True when ``name@version`` is published (yanked versions too)."""
        return version in self.read_index()["models"].get(name, {}).get("versions", {})

    # -- reading ----------------------------------------------------------------------------------

    def show(self, ref: str | ModelRef) -> dict[str, Any]:
        """The verified model card of a version, plus ``yanked`` from the index when it is."""
        name, version, entry = self.resolve(ref)
        card = self._card(name, version, entry)
        if entry.get("yanked"):
            card["yanked"] = entry["yanked"]
        if isinstance(card.get("snippets"), dict):
            card["snippets"] = rehome_snippets(card["snippets"], self.url)
        return card

    def exists_at_all(self) -> bool:
        """True when a hub index is stored at this URL (False for a mistyped path or a hub never pushed to)."""
        try:
            raw, _ = self.storage.read_versioned(INDEX)
        except OSError as e:
            raise RuntimeError(f"cannot read {INDEX} from hub {self.url}: {e}") from e
        return raw is not None

    def _card_raw(self, name: str, version: str, entry: Mapping[str, Any]) -> bytes:
        try:
            raw = self._read(f"{self.entry_path(name, version, entry)}/{CARD}")
        except FileNotFoundError:
            raise IntegrityError(f"{name}@{version}: {CARD} is missing from the hub") from None
        if sha256_bytes(raw) != entry["card_sha256"]:
            raise IntegrityError(f"{name}@{version}: {CARD} does not match the sha256 recorded in the index "
                                 "(tampered or truncated)")
        return raw

    def _card(self, name: str, version: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        return json.loads(self._card_raw(name, version, entry))

    def read_verified(self, ref: str | ModelRef, files: list[str] | None = None, *,
                      allow_yanked: bool = False) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(card, {relative path: bytes}) of a version, every file checked against the card's size and sha256."""
        name, version, entry = self.resolve(ref)
        self.check_yanked(name, version, entry, allow_yanked)
        card = self._card(name, version, entry)
        wanted = list(card["files"]) if files is None else files
        out = {}
        for rel in wanted:
            if rel not in card["files"]:
                raise ValueError(f"{name}@{version} has no file {rel!r}; files: {', '.join(card['files'])}")
            out[rel] = self._fetch_checked(name, version, entry, rel, card["files"][rel])
        return card, out

    def _fetch_checked(self, name: str, version: str, entry: Mapping[str, Any], rel: str,
                       expected: Mapping[str, Any]) -> bytes:
        try:
            data = self._read(f"{self.entry_path(name, version, entry)}/{rel}")
        except FileNotFoundError:
            raise IntegrityError(f"{name}@{version}: {rel} is missing from the hub") from None
        if len(data) != expected["size"]:
            raise IntegrityError(f"{name}@{version}: {rel} has {len(data)} bytes, the card records "
                                 f"{expected['size']} (truncated or tampered)")
        if sha256_bytes(data) != expected["sha256"]:
            raise IntegrityError(f"{name}@{version}: {rel} does not match its sha256 (tampered)")
        return data

    def pull(self, ref: str | ModelRef, dest: str | os.PathLike[str], *, allow_yanked: bool = False,
             skip_pickles: bool = False) -> Path:
        """Download a version into the local directory ``dest`` after verifying every file.

        Files land in a temporary folder next to ``dest`` that is renamed to ``dest`` only when every
        sha256 matched; on any error nothing is written at ``dest``. ``dest`` must not exist or be empty.
        A yanked version is refused unless ``allow_yanked`` (then a warning is logged). A pickle is never
        written: a version holding one (published by an older largessl) is refused, or with
        ``skip_pickles`` pulled without those files.
        """
        dest = Path(dest).resolve()
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ValueError(f"pull destination {dest} exists and is not an empty directory; choose a new path")
        name, version, entry = self.resolve(ref)
        self.check_yanked(name, version, entry, allow_yanked)
        card_raw = self._card_raw(name, version, entry)
        card = json.loads(card_raw)
        pickles = [rel for rel in card["files"] if is_pickle_bytes(b"", rel)]
        if pickles and not skip_pickles:
            raise ValueError(f"{name}@{version} holds pickled files ({', '.join(pickles)}), published by an older "
                             "largessl; hub pull never writes a pickle. Pass --skip-pickles to pull the rest")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.pull-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        written = 0
        try:
            for rel, expected in card["files"].items():
                target = tmp / rel
                if not target.resolve().is_relative_to(tmp.resolve()):
                    raise IntegrityError(f"{name}@{version}: card lists a path outside the model folder: {rel}")
                if rel in pickles:
                    log.warning("%s@%s: skipping %s (a pickle)", name, version, rel)
                    continue
                data = self._fetch_checked(name, version, entry, rel, expected)
                if is_pickle_bytes(data, rel):
                    if not skip_pickles:
                        raise ValueError(f"{name}@{version}: {rel} is a pickle; hub pull never writes one. "
                                         "Pass --skip-pickles to pull the rest")
                    log.warning("%s@%s: skipping %s (a pickle)", name, version, rel)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                # one file in memory at a time; backbones are at most a few hundred MB
                target.write_bytes(data)
                written += 1
            (tmp / CARD).write_bytes(card_raw)
            if dest.exists():
                dest.rmdir()  # empty by the check above
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("pulled %s@%s into %s (%d files verified)", name, version, dest, written)
        return dest

    # -- writing ----------------------------------------------------------------------------------

    def _commit(self, update: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Apply ``update`` to the index with compare-and-swap, re-reading on conflict; returns the new index.

        ``update`` mutates and returns the index, returns None when its change is already there (a retried
        write that had succeeded), or raises to abort.
        """
        with self.storage.lock():
            for attempt in range(_COMMIT_ATTEMPTS):
                raw, token = self.storage.read_versioned(INDEX)
                index = self._parse_index(raw)
                index["format"] = INDEX_FORMAT
                new = update(index)
                if new is None:
                    return index
                if self.storage.write_if(INDEX, _json_bytes(new), token) is not None:
                    return new
                # another commit won the race: back off a little (with jitter) and apply to its result
                time.sleep(min(0.05 * (2 ** min(attempt, 5)), 1.0) * random.uniform(0.5, 1.5))
        raise RuntimeError(f"hub {self.url}: could not update {INDEX} after {_COMMIT_ATTEMPTS} attempts "
                           "(heavy contention); retry the command")

    def push(self, name: str, version: str, files: Mapping[str, str | os.PathLike[str]],
             card: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Publish local ``files`` ({relative path: local file}) with ``card`` as ``name@version``.

        Adds ``name``, ``version``, ``created`` and the sha256/size of every file to the card, uploads the
        files and the card where no other push writes, then commits the index entry (see the module
        docstring) and rewrites the pages. Returns the card. A version that is already published, or that
        another live push is uploading, raises ``ValueError``: versions are written once. Pickles are refused.
        """
        check_name(name, "model name")
        check_name(version, "version")
        if not files:
            raise ValueError("nothing to push: give at least the backbone weights")
        for rel, src in files.items():
            if rel == CARD or rel.startswith("/") or ".." in Path(rel).parts or not rel:
                raise ValueError(f"invalid file name in a push: {rel!r}")
            if is_pickle_file(src):
                raise ValueError(f"refusing to publish {rel}: it is a pickle (loading it can run code). The hub "
                                 "stores safetensors and JSON only; convert it first (see largessl.hub.pickle_free)")
        card = dict(card)
        card.update(name=name, version=version, created=card.get("created") or utc_now())
        card["files"] = {rel: {"sha256": sha256_file(p), "size": os.path.getsize(p)} for rel, p in sorted(files.items())}
        card_raw = _json_bytes(card)
        push_id = uuid.uuid4().hex[:16]
        self._check_unpublished(name, version)
        lease = self._claim(name, version, push_id) if self.storage.needs_claims else None
        staged = None
        error: BaseException | None = None
        final: list[str] = []  # where finalize_version moved the staged folder (once, inside the commit)
        try:
            staged = self.storage.stage_version(name, version, push_id, files, CARD, card_raw)
            if lease is not None:
                self._check_claim(lease, push_id)

            def add(index: dict[str, Any]) -> dict[str, Any] | None:
                model = index["models"].setdefault(name, {"versions": {}})
                existing = model["versions"].get(version)
                if existing is not None:
                    if existing.get("push_id") == push_id:
                        return None  # our own earlier attempt succeeded (a lost response)
                    raise ValueError(f"{name}@{version} was published concurrently by another push; versions "
                                     "are written once, push a new --version")
                if not final:
                    final.append(self.storage.finalize_version(staged, name, version))
                index["seq"] = int(index.get("seq", 0) or 0) + 1
                model["versions"][version] = {
                    "created": card["created"], "card_sha256": sha256_bytes(card_raw), "path": final[0],
                    "push_id": push_id, "seq": index["seq"], "summary": dict(summary or {})}
                model["latest"] = latest_version(model)
                return index

            self._commit(add)
        except BaseException as e:
            error = e
        finally:
            if lease is not None:
                self._release(lease, push_id)
        if error is not None:
            # A failed request may still have been applied (the reply was lost): look before deleting anything.
            listed = self._listed_push(name, version, push_id) if staged is not None else False
            if listed is False and staged is not None:
                self.storage.discard(final[0] if final else staged)  # unlisted: nobody reads it
            if not (listed is True and isinstance(error, Exception)):
                raise error
            log.warning("%s@%s: the index update reported %r, but the index lists this push: published",
                        name, version, error)
        log.info("published %s@%s to %s", name, version, self.url)
        self.refresh_pages([name])
        return card

    def _listed_push(self, name: str, version: str, push_id: str) -> bool | None:
        """Whether the index lists ``name@version`` from push ``push_id`` (None when the index cannot be read)."""
        try:
            entry = self.read_index()["models"].get(name, {}).get("versions", {}).get(version)
        except (RuntimeError, OSError):
            return None
        return bool(entry) and entry.get("push_id") == push_id

    def _check_unpublished(self, name: str, version: str) -> None:
        if self.exists(name, version):
            raise ValueError(f"{name}@{version} already exists in hub {self.url}; versions are immutable, "
                             "push a new --version")

    def _claim(self, name: str, version: str, push_id: str) -> _Lease:
        """Create (or take over an expired) ``claims/<name>/<version>.json``; ValueError while a live push holds it."""
        rel = f"{CLAIMS_DIR}/{name}/{version}.json"
        for _ in range(8):
            body = {"push_id": push_id, "by": _who(), "started": utc_now(), "expires": time.time() + self.lease_s}
            token = self.storage.write_if(rel, _json_bytes(body), None)
            if token is not None:
                return _Lease(self.storage, rel, body, token, self.lease_s)
            raw, token = self.storage.read_versioned(rel)
            if raw is None:
                continue  # released meanwhile: try to create it again
            try:
                other = json.loads(raw)
                expires = float(other["expires"])
            except (ValueError, KeyError, TypeError):
                other, expires = {}, 0.0  # an unreadable claim protects nothing: treat it as expired
            if other.get("push_id") == push_id:
                return _Lease(self.storage, rel, other, token, self.lease_s)  # our create succeeded, reply lost
            self._check_unpublished(name, version)
            if expires > time.time():
                left = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).replace(microsecond=0)
                raise ValueError(
                    f"{name}@{version} is being published by another push ({other.get('by', '?')}, started "
                    f"{other.get('started', '?')}); versions are written once, so push a new --version. If that "
                    f"push died, its claim expires at {left.isoformat().replace('+00:00', 'Z')}")
            log.warning("%s@%s: taking over the expired claim of push %s (%s)", name, version,
                        other.get("push_id", "?"), other.get("by", "?"))
            token = self.storage.write_if(rel, _json_bytes(body), token)
            if token is not None:
                return _Lease(self.storage, rel, body, token, self.lease_s)
        raise RuntimeError(f"hub {self.url}: could not claim {name}@{version} (contended); retry the command")

    def _check_claim(self, lease: _Lease, push_id: str) -> None:
        """Fencing check before the commit: this push must still hold its claim."""
        raw, _ = self.storage.read_versioned(lease.rel)
        holder = json.loads(raw).get("push_id") if raw else None
        if lease.lost or holder != push_id:
            raise RuntimeError(f"this push lost its claim {lease.rel} (its lease of {self.lease_s:.0f}s expired and "
                               f"push {holder} took over); nothing was published, retry the command")

    def _release(self, lease: _Lease, push_id: str) -> None:
        lease.stop()
        try:
            raw, _ = self.storage.read_versioned(lease.rel)
            if raw and json.loads(raw).get("push_id") == push_id:
                self.storage.delete(lease.rel)
        except (RuntimeError, ValueError) as e:
            log.warning("could not release the claim %s (%s); it expires by itself", lease.rel, e)

    def yank(self, ref: str | ModelRef, reason: str) -> dict[str, Any]:
        """Mark ``NAME@VERSION`` deprecated (never deleted): pulls refuse it unless allowed, ``latest`` skips it."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if ref.version == LATEST:
            raise ValueError("yank needs an explicit version: NAME@VERSION")
        if not reason or not reason.strip():
            raise ValueError("yank needs a --reason that tells downstream users what is wrong with the version")
        record = {"reason": reason.strip(), "at": utc_now(), "by": _who()}

        def mark(index: dict[str, Any]) -> dict[str, Any]:
            model = index["models"].get(ref.name)
            if model is None or ref.version not in model["versions"]:
                self.resolve(ref)  # raises the usual "not in hub" / "no version" message
            entry = model["versions"][ref.version]
            if entry.get("yanked"):
                y = entry["yanked"]
                raise ValueError(f"{ref} is already yanked (on {y.get('at')}: {y.get('reason')})")
            entry["yanked"] = record
            model["latest"] = latest_version(model)
            return index

        self._commit(mark)
        log.warning("yanked %s in %s: %s", ref, self.url, record["reason"])
        self.refresh_pages([ref.name])
        return record

    # -- pages ------------------------------------------------------------------------------------

    def model_cards(self, name: str, model: Mapping[str, Any]) -> dict[str, dict[str, Any] | str]:
        """Every version's verified card (or the integrity error as text) for a model page."""
        cards: dict[str, dict[str, Any] | str] = {}
        for version, entry in model.get("versions", {}).items():
            try:
                card = self._card(name, version, entry)
                if isinstance(card.get("snippets"), dict):
                    card["snippets"] = rehome_snippets(card["snippets"], self.url)
                cards[version] = card
            except (IntegrityError, RuntimeError, ValueError) as e:
                log.warning("model page of %s: %s", name, e)
                cards[version] = str(e)
        return cards

    def refresh_pages(self, names: list[str] | None = None, attempts: int = 8) -> None:
        """Rewrite index.html and the pages of ``names`` (default: every model) from the current index.

        Pages are plain PUTs, so a push rendering an older index could land last; each writer therefore
        re-checks the index after writing and renders again if it changed. The last writer saw the last index.
        """
        with self.storage.lock():
            for _ in range(attempts):
                raw, token = self.storage.read_versioned(INDEX)
                index = self._parse_index(raw)
                todo = sorted(index["models"]) if names is None else [n for n in names if n in index["models"]]
                self.storage.write(INDEX_HTML, render_index_html(index, hub_url=self.url).encode())
                for n in todo:
                    model = index["models"][n]
                    html = render_model_page(n, model, self.model_cards(n, model), hub_url=self.url)
                    self.storage.write(f"{PAGES_DIR}/{model_page_name(n)}", html.encode())
                if self.storage.token(INDEX) == token:
                    return
        log.warning("hub %s: the index kept changing while its pages were written; the next push or "
                    "`largessl hub pages` rewrites them", self.url)

    def write_index_html(self, index: Mapping[str, Any] | None = None) -> None:
        """Rewrite every page (kept for callers of the old name)."""
        self.refresh_pages(None)
