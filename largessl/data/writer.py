"""Write WebDataset tar shards plus the dataset manifest (``largessl shards write``).

Sources: an ImageFolder tree (one sub-directory per class) or a list file of ``path label`` lines.
The original image bytes are stored unchanged (``KEY.jpg``) with the class index (``KEY.cls``, ASCII
int). Keys are the zero-padded position in the sorted source listing: stable across runs, and they
never contain dots (webdataset splits keys at the first dot). Tar headers carry fixed mtime/owner, so
the same source gives byte-identical shards and the same manifest id.

Shard boundaries are planned up front from file sizes, so shards are independent jobs written in
parallel straight to any fsspec URL. Beside each shard goes its sample-offset index (``NAME.idx``, DALI's
format) and beside the set wids' ``shardindex.json`` (see :mod:`largessl.data.shard_index`): the streams
seek with the index on resume, and wids and DALI read the shards as they are. The manifest is written
last (see :mod:`largessl.data.manifest`).
"""

from __future__ import annotations

import hashlib
import io as pyio
import logging
import os
import random
import tarfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from largessl.data import io
from largessl.data.manifest import MANIFEST_NAME, write_manifest
from largessl.data.shard_index import WIDS_INDEX_NAME, Member, format_index, index_name, wids_shard_index

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".JPEG")
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SourceSample:
    """One sample to write: raw bytes or a local path, its class index and the stored extension."""

    key: str
    data: bytes | str
    label: int
    ext: str = "jpg"

    def size(self) -> int:
        """Bytes this sample adds to a shard (payload only; tar headers are small)."""
        return len(self.data) if isinstance(self.data, bytes) else os.path.getsize(self.data)

    def read(self) -> bytes:
        """The payload bytes."""
        if isinstance(self.data, bytes):
            return self.data
        with open(self.data, "rb") as f:
            return f.read()


def _ext_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jpg") else ext


def scan_image_folder(root: str) -> tuple[list[SourceSample], list[str]]:
    """Samples of an ImageFolder tree (sorted classes, sorted files) and its class names."""
    if not os.path.isdir(root):
        raise ValueError(f"source {root} is not a directory; give an ImageFolder tree or a list file")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"source {root} has no class sub-directories (expected ROOT/CLASS/IMAGE.jpg)")
    samples: list[SourceSample] = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            dirnames.sort()
            for name in sorted(files):
                if name.lower().endswith(tuple(e.lower() for e in IMAGE_EXTENSIONS)):
                    path = os.path.join(dirpath, name)
                    samples.append(SourceSample(f"{len(samples):09d}", path, label, _ext_of(path)))
    if not samples:
        raise ValueError(f"source {root} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return samples, classes


def scan_list_file(path: str) -> tuple[list[SourceSample], list[str]]:
    """Samples of a list file: one ``PATH LABEL`` per line (relative paths are relative to the file).

    LABEL is an integer class index or a class name; names are numbered in sorted order.
    """
    base = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1) if "\t" not in line else line.rsplit("\t", 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'PATH LABEL', got {line!r}")
            p, lab = parts[0].strip(), parts[1].strip()
            rows.append((p if os.path.isabs(p) else os.path.join(base, p), lab))
    if not rows:
        raise ValueError(f"list file {path} holds no samples")
    if all(lab.lstrip("-").isdigit() for _, lab in rows):
        labels = [int(lab) for _, lab in rows]
        if min(labels) < 0:
            raise ValueError(f"list file {path}: class indices must be >= 0")
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        class_names = sorted({lab for _, lab in rows})
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[lab] for _, lab in rows]
    missing = next((p for p, _ in rows if not os.path.isfile(p)), None)
    if missing:
        raise ValueError(f"list file {path} names {missing}, which does not exist")
    samples = [SourceSample(f"{i:09d}", p, lab, _ext_of(p)) for i, ((p, _), lab) in enumerate(zip(rows, labels))]
    return samples, class_names


def scan_source(src: str) -> tuple[list[SourceSample], list[str]]:
    """ImageFolder directory or list file → (samples, class names)."""
    if os.path.isdir(src):
        return scan_image_folder(src)
    if os.path.isfile(src):
        return scan_list_file(src)
    raise ValueError(f"source {src} does not exist; give an ImageFolder directory or a list file of 'PATH LABEL'")


def tar_bytes(sample: SourceSample) -> int:
    """Bytes the sample takes in a tar: a 512-byte header per member, payloads padded to 512."""
    return 512 + -(-sample.size() // 512) * 512 + 512 + 512


def plan_shards(samples: Sequence[SourceSample], shard_bytes: int) -> list[list[SourceSample]]:
    """Split samples in order into shards of about ``shard_bytes`` (each holds at least one sample)."""
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be > 0 bytes (got {shard_bytes})")
    shards: list[list[SourceSample]] = [[]]
    size = 0
    for s in samples:
        n = tar_bytes(s)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


class _HashingWriter:
    """File-like wrapper that hashes and counts what passes through to the real (remote) file."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        self.f.write(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


def _add(tar: tarfile.TarFile, name: str, payload: bytes, ext: str) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed header fields: same source -> byte-identical shard and sha256
    info.mode = 0o444
    info.uname = info.gname = "largessl"
    tar.addfile(info, pyio.BytesIO(payload))
    # tar.offset is past the payload's padding now; the payload starts that many blocks back
    return Member(ext, tar.offset - -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(payload), name)


def write_shard(url: str, samples: Sequence[SourceSample], storage_options: Mapping[str, Any] | None = None,
                on_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write one tar shard to ``url`` and its sample-offset index beside it.

    Returns ``{num_samples, sha256, bytes, index}`` (``index``: the index file's name, relative to the shard's folder).
    """
    members: list[list[Member]] = []
    with io.open_url(url, "wb", storage_options) as f:
        hw = _HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            for s in samples:
                members.append([_add(tar, f"{s.key}.{s.ext}", s.read(), s.ext),
                                _add(tar, f"{s.key}.cls", str(s.label).encode(), "cls")])
                if on_sample:
                    on_sample()
    name = index_name(url.rsplit("/", 1)[-1])
    with io.open_url(io.join_url(io.dirname_url(url), name), "wb", storage_options) as f:
        f.write(format_index(members))
    return {"num_samples": len(samples), "sha256": hw.sha.hexdigest(), "bytes": hw.bytes, "index": name}


def write_shards(samples: Sequence[SourceSample], class_names: Sequence[str], dest: str, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "shard", workers: int = 4,
                 overwrite: bool = False, storage_options: Mapping[str, Any] | None = None,
                 progress: bool = True, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``samples`` as shards under ``dest`` (any fsspec URL) and the manifest last; returns the manifest URL."""
    if not samples:
        raise ValueError("no samples to write")
    opts = storage_options if storage_options is not None else io.storage_options_for(dest)
    manifest_url = io.join_url(dest, MANIFEST_NAME)
    fs = io.filesystem(dest, opts)
    if fs.exists(io.strip_protocol(manifest_url)):
        if not overwrite:
            raise ValueError(f"{manifest_url} already exists (a complete dataset); pass --overwrite to replace it")
        # remove the manifest first: if this rewrite dies half-way the folder reads as incomplete, not as the old set
        fs.rm(io.strip_protocol(manifest_url))
        log.warning("overwriting the dataset at %s", dest)
    if io.protocol_of(dest) == "file":
        os.makedirs(io.strip_protocol(dest), exist_ok=True)
    plan = plan_shards(samples, shard_bytes)
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(plan))]
    log.info("writing %d samples in %d shards to %s with %d workers", len(samples), len(plan), dest, workers)

    from tqdm import tqdm

    bar = tqdm(total=len(samples), unit="img", desc="shards write", disable=not progress, smoothing=0.05)
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(write_shard, io.join_url(dest, n), p, opts, lambda: bar.update(1))
                       for n, p in zip(names, plan)]
            results = [fut.result() for fut in futures]
    finally:
        bar.close()
    rows = [{"url": n, **r} for n, r in zip(names, results)]
    write_wids_index(dest, rows, prefix, opts)
    info = {"shard_bytes_target": shard_bytes, **dict(extra or {})}
    mid = write_manifest(manifest_url, rows, class_names, extra=info, storage_options=opts)
    log.info("wrote %s (%d shards, %d samples, id %s)", manifest_url, len(rows), len(samples), mid[:12])
    return manifest_url


def write_wids_index(dest: str, rows: Sequence[Mapping[str, Any]], name: str,
                     storage_options: Mapping[str, Any] | None = None) -> str:
    """Write wids' ``shardindex.json`` for ``rows`` (urls relative to ``dest``) into ``dest``; returns its URL."""
    import json

    url = io.join_url(dest, WIDS_INDEX_NAME)
    with io.open_url(url, "wb", storage_options) as f:
        f.write(json.dumps(wids_shard_index(rows, name), indent=1).encode())
    return url


def index_dataset(manifest_url: str, storage_options: Mapping[str, Any] | None = None, workers: int = 4,
                  progress: bool = True) -> str:
    """``largessl shards index``: write each shard's ``.idx`` and ``shardindex.json``, then the manifest with them.

    For datasets written before the indexes: every shard is read once, front to back. The manifest keeps
    its id (indexes are left out of it) and is replaced atomically, last. Returns the manifest id.
    """
    import json

    from largessl.data.manifest import parse_manifest
    from largessl.data.shard_index import scan_members

    opts = storage_options if storage_options is not None else io.storage_options_for(manifest_url)
    with io.open_url(manifest_url, "rb", opts) as f:
        text = f.read()
    manifest = parse_manifest(text, manifest_url)  # validates; resolves the shard URLs
    stored = json.loads(text)

    from tqdm import tqdm

    bar = tqdm(total=len(manifest.shards), unit="shard", desc="shards index", disable=not progress)

    def index_one(i: int) -> str:
        url = manifest.shards[i].url
        with io.open_url(url, "rb", opts) as f:
            members = scan_members(f)
        if len(members) != manifest.shards[i].num_samples:
            raise RuntimeError(f"shard {url} holds {len(members)} samples, the manifest says "
                               f"{manifest.shards[i].num_samples}; rewrite the dataset with `largessl shards write`")
        name = index_name(url.rsplit("/", 1)[-1])
        with io.open_url(io.join_url(io.dirname_url(url), name), "wb", opts) as f:
            f.write(format_index(members))
        bar.update(1)
        return name

    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            names = list(pool.map(index_one, range(len(manifest.shards))))
    finally:
        bar.close()
    rows = [dict(row, index=name) for row, name in zip(stored["shards"], names)]
    folder = io.dirname_url(manifest_url)
    first = str(rows[0]["url"]).rsplit("/", 1)[-1]
    write_wids_index(folder, rows, first.rsplit("-", 1)[0] if "-" in first else "dataset", opts)  # the prefix
    mid = write_manifest(manifest_url, rows, stored.get("class_names", []), extra=stored.get("extra"),
                         storage_options=opts)
    assert mid == manifest.id, (mid, manifest.id)  # indexes are not part of the id
    log.info("indexed %d shards of %s (id %s unchanged)", len(rows), manifest_url, mid[:12])
    return mid


def write_source(src: str, dest: str, shuffle_seed: int | None = 0, **kwargs: Any) -> str:
    """``largessl shards write SRC DEST``: scan an ImageFolder tree or list file, then :func:`write_shards`.

    With ``shuffle_seed`` (default 0) the samples are shuffled once before sharding, so every shard mixes
    classes (an ImageFolder listing is sorted by class, and the reader only shuffles within a buffer).
    Keys keep the sorted-listing numbering, so they are stable whatever the seed.
    """
    samples, class_names = scan_source(src)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    extra = {"source": os.path.abspath(src), "shuffle_seed": shuffle_seed}
    return write_shards(samples, class_names, dest, extra=extra, **kwargs)
