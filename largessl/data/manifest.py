"""The dataset manifest: the one file that says a set of WebDataset shards is complete.

``largessl shards write`` writes it last, after every shard is closed, so a half-written dataset has
no manifest and is never mistaken for a complete one. Format (JSON, ``manifest.json`` beside the shards)::

    {"format": "largessl.manifest", "version": 1,
     "shards": [{"url": "train-000000.tar", "num_samples": 1251, "sha256": "...", "bytes": 268435456,
                 "index": "train-000000.idx"}, ...],
     "class_names": ["n01440764", ...], "num_samples": 1281167}

Shard URLs are stored relative to the manifest's folder (so a dataset can be copied between buckets)
and resolved to absolute URLs by :func:`read_manifest`; ``index`` (optional: the shard's sample-offset
index, see :mod:`largessl.data.shard_index`) is relative to its shard's folder. The manifest ``id`` is
the sha256 of the canonical JSON of the stored (relative) content without the indexes, which are derived
data: it names the dataset in model cards, and adding indexes to a dataset keeps its id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from largessl.data import io

log = logging.getLogger(__name__)

FORMAT = "largessl.manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: where it is, how many samples it holds and its content hash."""

    url: str
    num_samples: int
    sha256: str = ""
    bytes: int = 0
    index: str = ""
    """Absolute URL of the shard's sample-offset index (DALI ``.idx``); empty = none (the stream scans)."""

    def __getitem__(self, key: str) -> Any:
        """Dict-style access (``shard['url']``) for code that treats shards as mappings."""
        return getattr(self, key)


@dataclass(frozen=True)
class Manifest:
    """A complete dataset: shards (absolute URLs), class names and the total sample count."""

    shards: list[ShardInfo]
    class_names: list[str]
    num_samples: int
    id: str = ""
    """sha256 of the canonical stored JSON (relative shard URLs), stable across copies of the dataset."""
    url: str = ""
    """Where this manifest was read from (empty for one built in memory)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance written by the writer (source, shard size target, ...)."""

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled dataset)."""
        return len(self.class_names)

    @property
    def shard_starts(self) -> list[int]:
        """Global index of each shard's first sample (manifest order)."""
        starts, total = [], 0
        for s in self.shards:
            starts.append(total)
            total += s.num_samples
        return starts


def _stored_dict(shards: Sequence[Mapping[str, Any] | ShardInfo], class_names: Sequence[str],
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    rows = []
    for s in shards:
        d = s if isinstance(s, Mapping) else s.__dict__
        row = {"url": str(d["url"]), "num_samples": int(d["num_samples"]), "sha256": str(d.get("sha256", "")),
               "bytes": int(d.get("bytes", 0))}
        if d.get("index"):
            row["index"] = str(d["index"])
        rows.append(row)
    return {
        "format": FORMAT,
        "version": VERSION,
        "shards": rows,
        "class_names": [str(c) for c in class_names],
        "num_samples": sum(r["num_samples"] for r in rows),
        "extra": dict(extra or {}),
    }


def _canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def manifest_id(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the stored manifest (without provenance extras and shard indexes)."""
    core = {k: v for k, v in data.items() if k != "extra"}
    if isinstance(core.get("shards"), list):
        core["shards"] = [{k: v for k, v in s.items() if k != "index"} if isinstance(s, dict) else s
                          for s in core["shards"]]
    return hashlib.sha256(_canonical(core)).hexdigest()


def write_manifest(url: str, shards: Sequence[Mapping[str, Any] | ShardInfo], class_names: Sequence[str],
                   extra: Mapping[str, Any] | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the manifest atomically (temp object + rename, or a single PUT on object stores); returns its id.

    ``shards`` urls should be relative to the manifest's folder (absolute URLs are kept as they are).
    """
    data = _stored_dict(shards, class_names, extra)
    if not data["shards"]:
        raise ValueError("refusing to write a manifest with no shards; the source held no samples")
    text = json.dumps(data, indent=1).encode()
    fs = io.filesystem(url, storage_options)
    path = io.strip_protocol(url)
    if io.protocol_of(url) == "file":
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        # An object-store PUT is atomic: readers see the old object, nothing, or the whole new one.
        fs.pipe_file(path, text)
    return manifest_id(data)


def parse_manifest(text: bytes | str, url: str = "") -> Manifest:
    """Parse and check manifest JSON; shard URLs are resolved against ``url``'s folder."""
    where = url or "<manifest>"
    if not text or not str(text if isinstance(text, str) else text.decode("utf-8", "replace")).strip():
        raise ValueError(f"manifest {where} is empty; re-run `largessl shards write` to produce a complete dataset")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {where} is not valid JSON ({e}); re-run `largessl shards write`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"manifest {where} is not a largessl manifest (expected a JSON object with format={FORMAT!r}); "
            "point data.train_manifest at the manifest.json written by `largessl shards write`"
        )
    if data.get("version") != VERSION:
        raise ValueError(f"manifest {where} has version {data.get('version')!r}; this largessl reads version {VERSION}")
    shards_raw = data.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise ValueError(f"manifest {where} lists no shards; the dataset is empty")
    class_names = data.get("class_names", [])
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"manifest {where}: class_names must be a list of strings")
    base = io.dirname_url(url)
    shards = []
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict) or not isinstance(s.get("url"), str) or not s["url"]:
            raise ValueError(f"manifest {where}: shard #{i} has no url")
        n = s.get("num_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"manifest {where}: shard #{i} ({s['url']}) has an invalid num_samples {n!r}")
        index = s.get("index") or ""
        if not isinstance(index, str):
            raise ValueError(f"manifest {where}: shard #{i} ({s['url']}) has an invalid index {index!r}")
        shard_url = io.join_url(base, s["url"])
        shards.append(ShardInfo(url=shard_url, num_samples=n, sha256=str(s.get("sha256", "")),
                                bytes=int(s.get("bytes", 0) or 0),
                                index=io.join_url(io.dirname_url(shard_url), index) if index else ""))
    total = sum(s.num_samples for s in shards)
    if data.get("num_samples") != total:
        raise ValueError(
            f"manifest {where}: num_samples={data.get('num_samples')!r} but the shards hold {total}; "
            "the manifest was edited or truncated, re-run `largessl shards write`"
        )
    if total == 0:
        raise ValueError(f"manifest {where} holds 0 samples; the dataset is empty")
    return Manifest(shards=shards, class_names=list(class_names), num_samples=total, id=manifest_id(data),
                    url=url, extra=dict(data.get("extra") or {}))


def check_shards_exist(manifest: Manifest, storage_options: Mapping[str, Any] | None = None, retries: int = 3,
                       backoff_s: float = 1.0) -> None:
    """Raise ``ValueError`` naming the first missing shard URL (one listing per folder where possible). A server
    that keeps failing (5xx, throttling, no connection) raises ``RuntimeError`` saying so instead: that is not a
    missing shard, and a retry may help."""
    by_dir: dict[str, list[str]] = {}
    for s in manifest.shards:
        by_dir.setdefault(io.dirname_url(s.url), []).append(s.url)
    for folder, urls in by_dir.items():
        fs = io.filesystem(urls[0], storage_options)
        fs.invalidate_cache(io.strip_protocol(folder))  # s3fs caches listings: a start-up check must look afresh
        present: set[str] | None = None
        if io.protocol_of(urls[0]) != "http" and len(urls) > 1:
            try:
                present = {p.rstrip("/") for p in fs.ls(io.strip_protocol(folder), detail=False)}
            except (OSError, ValueError):
                present = None  # no listing permission: fall back to one HEAD per shard
        for u in urls:
            path = io.strip_protocol(u)
            ok = (present is not None and path in present) or io.probe(u, storage_options, retries, backoff_s)
            if not ok:
                raise ValueError(
                    f"shard {u} listed in manifest {manifest.url or '<memory>'} does not exist (the server says so); "
                    "the dataset is incomplete or the endpoint/bucket is wrong"
                )


def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None, check_shards: bool = True,
                  retries: int = 3, backoff_s: float = 1.0) -> Manifest:
    """Read and validate a manifest; with ``check_shards`` every shard must exist (checked once, at start-up).

    A missing manifest or shard is bad input (``ValueError``, exit code 2): no retry makes it appear. Transient
    server errors (5xx, throttling, dropped connections) are retried ``retries`` times with exponential backoff,
    then raise ``RuntimeError`` (exit code 3).
    """
    if not url:
        raise ValueError("no manifest given; set data.train_manifest to a manifest.json written by `largessl shards write`")
    opts = storage_options if storage_options is not None else io.storage_options_for(url)

    def fetch() -> bytes:
        with io.open_url(url, "rb", opts) as f:
            return f.read()

    try:
        text = io.with_retries(fetch, f"reading manifest {url}", max(1, retries), backoff_s)
    except FileNotFoundError as e:
        if io.is_transient(e):
            raise RuntimeError(f"manifest {url}: the server kept failing ({io.describe_error(e)}); retry later") from e
        raise ValueError(f"manifest {url} does not exist (was `largessl shards write` run to completion? is the "
                         "path, bucket or endpoint right?)") from None
    except Exception as e:
        if io.is_transient(e):
            raise RuntimeError(f"manifest {url}: the server kept failing ({io.describe_error(e)}); retry later") from e
        raise
    manifest = parse_manifest(text, url)
    if check_shards:
        check_shards_exist(manifest, opts, retries, backoff_s)
    log.info("manifest %s: %d samples in %d shards, %d classes (id %s)", url, manifest.num_samples,
             len(manifest.shards), manifest.num_classes, manifest.id[:12])
    return manifest
