"""Label subsets of a sharded dataset (``largessl shards subset``): 1% / 10% of ImageNet as their own manifests.

A subset is a complete dataset of its own: new shards holding copies of the selected samples (original
keys, bytes and labels) and a manifest written last, whose ``extra["subset"]`` records how it was made —
the source manifest and its id, the method (a seeded class-balanced draw, or an image list file such as
SimCLR's ``1percent.txt``) and the sha256 of the sorted selected keys. Every stream, the linear and
fine-tuning protocols read it like any dataset; :func:`verify_subset` re-derives the selection from the
source and checks the subset's shards against it.

Selection rules:

* **seeded draw** (``percent``, ``seed``): class-balanced — every class keeps ``max(1, round(n_c · p / 100))``
  of its ``n_c`` samples: those with the smallest ``sha256(f"{seed}:{key}")``. It depends only on the keys,
  labels and seed, not on the shard layout or the number of workers.
* **list file**: one entry a line (``#`` comments and blank lines skipped; the first word counts). An entry
  is a shard key, or an image file name (``n01440764_10026.JPEG``) resolved through the ImageFolder the
  shards were written from (``source_root``; ``largessl shards write`` numbers keys by the sorted listing).
  A name whose prefix before ``_`` is a class name must carry that class's label.

The work is split per shard, so :func:`scan_shard` and :func:`write_output` run in threads (the CLI) or
on the ranks of a stage job; :func:`select` and :func:`plan_outputs` are pure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from largessl.data import io
from largessl.data.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest
from largessl.data.stream import IMAGE_EXTS, iter_tar_samples
from largessl.data.writer import SourceSample, scan_image_folder, write_shard

log = logging.getLogger(__name__)

SUBSET_PREFIX = "subset"
DEFAULT_SAMPLE_BYTES = 110_000
"""Average ImageNet JPEG size: the output-shard plan's guess when the source manifest records no bytes."""


@dataclass(frozen=True)
class SubsetRequest:
    """How to select a subset: ``percent`` + ``seed`` (class-balanced draw) or a ``list_file``."""

    percent: float = 0.0
    """Percent of each class for the seeded draw (ignored with ``list_file``)."""
    seed: int = 0
    list_file: str = ""
    """Image list (SimCLR style) or key list; wins over ``percent``."""
    source_root: str = ""
    """ImageFolder the source shards were written from (to resolve image file names)."""

    def validate(self) -> None:
        """Check that exactly one method is given and in range."""
        if not self.list_file and not 0.0 < self.percent <= 100.0:
            raise ValueError(f"a subset needs --percent in (0, 100] or --list FILE (got percent={self.percent})")

    @property
    def method(self) -> str:
        """``list`` or ``seeded``."""
        return "list" if self.list_file else "seeded"

    def identity(self) -> dict[str, Any]:
        """What makes two subsets of the same source the same (stored in the manifest, compared on reuse)."""
        if self.list_file:
            return {"method": "list", "list_sha256": _file_sha256(self.list_file)}
        return {"method": "seeded", "percent": float(self.percent), "seed": int(self.seed)}


@dataclass
class ShardIndex:
    """Keys, labels and image extensions of one source shard's samples, in shard order."""

    keys: list[str]
    labels: list[int]
    exts: list[str]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _Hashing:
    """Read-through file wrapper that hashes every byte it returns."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        return b


def _scan_stream(f: IO[bytes], where: str) -> ShardIndex:
    keys: list[str] = []
    labels: list[int] = []
    exts: list[str] = []
    with tarfile.open(fileobj=f, mode="r|") as tar:  # type: ignore[call-overload]
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_key(m.name)
            if not keys or keys[-1] != key:
                keys.append(key)
                labels.append(-1)
                exts.append("")
            if ext == "cls":
                data = tar.extractfile(m)
                try:
                    labels[-1] = int((data.read() if data is not None else b"").decode().strip())
                except (UnicodeDecodeError, ValueError):
                    raise ValueError(f"{where}: sample {key} has an unreadable label") from None
            elif ext in IMAGE_EXTS and not exts[-1]:
                exts[-1] = ext
    return ShardIndex(keys, labels, exts)


def scan_shard(manifest: Manifest, shard: int, storage_options: Mapping[str, Any] | None = None,
               verify_hash: bool = False) -> ShardIndex:
    """Keys and labels of one shard (image payloads are skipped); checks the count (and sha256) against the manifest."""
    info = manifest.shards[shard]
    with io.open_url(info.url, "rb", storage_options) as raw:
        f = _Hashing(raw)
        index = _scan_stream(f, info.url)  # type: ignore[arg-type]
        while f.read(1 << 20):  # the tar end-of-archive padding is part of the hashed file
            pass
    if len(index.keys) != info.num_samples:
        raise RuntimeError(f"shard {info.url} holds {len(index.keys)} samples, the manifest says {info.num_samples}; "
                           "verify the dataset with `largessl shards verify`")
    if verify_hash and info.sha256 and f.sha.hexdigest() != info.sha256:
        raise RuntimeError(f"shard {info.url} does not match its sha256 in {manifest.url}")
    return index


def _priority(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _quota(n: int, percent: float) -> int:
    return min(n, max(1, int(n * percent / 100.0 + 0.5)))


def _list_entries(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"label list file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line.split()[0])
    if not out:
        raise ValueError(f"label list file {path} lists no images")
    if len(set(out)) != len(out):
        dup = next(e for e in out if out.count(e) > 1)
        raise ValueError(f"label list file {path} names {dup} more than once")
    return out


def _names_to_keys(root: str, manifest: Manifest) -> dict[str, str]:
    """Image file name → shard key, from the ImageFolder listing `largessl shards write` numbered."""
    samples, classes = scan_image_folder(root)
    if len(samples) != manifest.num_samples or classes != manifest.class_names:
        raise ValueError(f"{root} holds {len(samples)} images in {len(classes)} classes but {manifest.url} has "
                         f"{manifest.num_samples} samples in {manifest.num_classes} classes: it is not the folder "
                         "these shards were written from (pass --source-root)")
    out: dict[str, str] = {}
    for s in samples:
        name = os.path.basename(str(s.data))
        if name in out:
            raise ValueError(f"{root} holds two images named {name}; list files must use shard keys then")
        out[name] = s.key
    return out


def select(manifest: Manifest, index: Mapping[int, ShardIndex], request: SubsetRequest) -> list[tuple[int, int]]:
    """The selected samples as ``(shard, offset)`` in manifest order (pure; every caller gets the same list)."""
    request.validate()
    where: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    for s in range(len(manifest.shards)):
        ix = index[s]
        for o, (key, lab) in enumerate(zip(ix.keys, ix.labels)):
            if key in where:
                raise ValueError(f"{manifest.url}: key {key} appears twice; keys must be unique to select by them")
            where[key] = (s, o)
            labels[key] = lab
    if request.list_file:
        entries = _list_entries(request.list_file)
        names: dict[str, str] | None = None
        keys = []
        missing = []
        for e in entries:
            if e in where:
                keys.append(e)
                continue
            if names is None:
                root = request.source_root or str(manifest.extra.get("source", ""))
                if not root or not os.path.isdir(root):
                    raise ValueError(f"{request.list_file} names images ({e}) that are not shard keys; pass the "
                                     "ImageFolder the shards were written from (--source-root / "
                                     "eval.finetune.source_root)")
                names = _names_to_keys(root, manifest)
            key = names.get(e)
            if key is None:
                missing.append(e)
                continue
            prefix = e.split("_", 1)[0]
            if "_" in e and prefix in manifest.class_names and labels[key] != manifest.class_names.index(prefix):
                raise ValueError(f"{e} is listed for class {prefix} but its shard label is "
                                 f"{manifest.class_names[labels[key]]}: the list does not match these shards")
            keys.append(key)
        if missing:
            raise ValueError(f"{len(missing)} entries of {request.list_file} are not in {manifest.url}: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        chosen = set(keys)
    else:
        by_class: dict[int, list[str]] = {}
        for key, lab in labels.items():
            if lab < 0:
                raise ValueError(f"{manifest.url}: sample {key} has no label; a class-balanced draw needs labels")
            by_class.setdefault(lab, []).append(key)
        chosen = set()
        for _lab, members in sorted(by_class.items()):
            members.sort(key=lambda k: _priority(request.seed, k))
            chosen.update(members[:_quota(len(members), request.percent)])
    return sorted(where[k] for k in chosen)


def plan_outputs(manifest: Manifest, selection: Sequence[tuple[int, int]], shard_bytes: int) -> list[list[tuple[int, int]]]:
    """Consecutive runs of the selection, one per output shard of about ``shard_bytes``."""
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be > 0 bytes (got {shard_bytes})")
    total_bytes = sum(s.bytes for s in manifest.shards)
    per_sample = total_bytes / manifest.num_samples if total_bytes else DEFAULT_SAMPLE_BYTES
    per_shard = max(1, int(shard_bytes // max(per_sample, 1.0)))
    return [list(selection[i:i + per_shard]) for i in range(0, len(selection), per_shard)]


def output_name(j: int) -> str:
    """File name of output shard ``j``."""
    return f"{SUBSET_PREFIX}-{j:06d}.tar"


def write_output(manifest: Manifest, dest: str, j: int, positions: Sequence[tuple[int, int]],
                 storage_options: Mapping[str, Any] | None = None,
                 on_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Copy the samples at ``positions`` into output shard ``j`` under ``dest``; returns its manifest row."""
    by_shard: dict[int, list[int]] = {}
    for s, o in positions:
        by_shard.setdefault(s, []).append(o)
    samples: list[SourceSample] = []
    for s, offsets in by_shard.items():
        want = set(offsets)
        url = manifest.shards[s].url
        got = 0
        with io.open_url(url, "rb", storage_options) as f:
            for off, key, fields in iter_tar_samples(f, want.__contains__):
                if off not in want:
                    if off > max(want):
                        break
                    continue
                image_ext = next((e for e in IMAGE_EXTS if e in fields), None)
                if image_ext is None or "cls" not in fields:
                    raise RuntimeError(f"{url}: sample {key} has no image or no label; cannot copy it")
                samples.append(SourceSample(key, fields[image_ext], int(fields["cls"].decode().strip()), image_ext))
                got += 1
        if got != len(want):
            raise RuntimeError(f"{url} ended before the selected samples; verify it with `largessl shards verify`")
    if io.protocol_of(dest) == "file":
        os.makedirs(io.strip_protocol(dest), exist_ok=True)
    row = write_shard(io.join_url(dest, output_name(j)), samples, storage_options, on_sample)
    return {"url": output_name(j), **row}


def finish(manifest: Manifest, dest: str, rows: Sequence[Mapping[str, Any]], request: SubsetRequest,
           selection: Sequence[tuple[int, int]], index: Mapping[int, ShardIndex],
           storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the subset's manifest (last, atomically); returns its URL."""
    keys = sorted(index[s].keys[o] for s, o in selection)
    per_class = [0] * manifest.num_classes
    for s, o in selection:
        lab = index[s].labels[o]
        if 0 <= lab < len(per_class):
            per_class[lab] += 1
    info = {**request.identity(), "source_manifest": manifest.url, "source_id": manifest.id,
            "source_samples": manifest.num_samples, "num_selected": len(selection),
            "fraction": len(selection) / manifest.num_samples, "per_class": per_class,
            "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}
    if request.list_file:
        info["list_file"] = os.path.abspath(request.list_file)
    url = io.join_url(dest, MANIFEST_NAME)
    mid = write_manifest(url, list(rows), manifest.class_names, extra={"subset": info}, storage_options=storage_options)
    log.info("subset %s: %d of %d samples (%.2f%%) in %d shards, id %s", url, len(selection), manifest.num_samples,
             100.0 * len(selection) / manifest.num_samples, len(rows), mid[:12])
    return url


def existing_subset(dest: str, manifest: Manifest, request: SubsetRequest,
                    storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The URL of a complete subset at ``dest`` made the same way from ``manifest``; None if there is none.

    Raises ``ValueError`` when ``dest`` holds a different subset (or another dataset): nothing is overwritten.
    """
    url = io.join_url(dest, MANIFEST_NAME)
    if not io.exists(url, storage_options):
        return None
    sub = read_manifest(url, storage_options, check_shards=True)
    info = sub.extra.get("subset")
    want = {**request.identity(), "source_id": manifest.id}
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in want.items()):
        got = {k: (info or {}).get(k) for k in want} if isinstance(info, dict) else "not a subset"
        raise ValueError(f"{url} holds a different dataset ({got}; wanted {want}); choose another destination "
                         "or delete it")
    return url


def build_subset(source_url: str, dest: str, request: SubsetRequest, workers: int = 8,
                 shard_bytes: int = 256 * 1000**2, endpoint_url: str = "", progress: bool = True) -> str:
    """Select and write a subset of ``source_url`` at ``dest`` with a thread pool; reuse an identical one."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    request.validate()
    opts = io.storage_options_for(source_url, endpoint_url)
    manifest = read_manifest(source_url, opts)
    dest_opts = io.storage_options_for(dest, endpoint_url)
    found = existing_subset(dest, manifest, request, dest_opts)
    if found:
        log.info("reusing the identical subset %s", found)
        return found
    with ThreadPoolExecutor(max(1, workers)) as pool:
        bar = tqdm(total=len(manifest.shards), unit="shard", desc="subset: scan labels", disable=not progress)
        index: dict[int, ShardIndex] = {}

        def scan(i: int) -> None:
            index[i] = scan_shard(manifest, i, opts)
            bar.update(1)

        list(pool.map(scan, range(len(manifest.shards))))
        bar.close()
        selection = select(manifest, index, request)
        plan = plan_outputs(manifest, selection, shard_bytes)
        bar = tqdm(total=len(selection), unit="img", desc="subset: copy", disable=not progress)
        rows = list(pool.map(lambda j: write_output(manifest, dest, j, plan[j], dest_opts, lambda: bar.update(1)),
                             range(len(plan))))
        bar.close()
    return finish(manifest, dest, rows, request, selection, index, dest_opts)


def verify_subset(subset_url: str, source_url: str = "", workers: int = 8, endpoint_url: str = "") -> dict[str, Any]:
    """Check a subset against its source: ids, re-derived selection, keys, labels and shard hashes.

    Raises ``ValueError`` naming the first mismatch; returns the manifest's ``subset`` record.
    """
    from concurrent.futures import ThreadPoolExecutor

    opts = io.storage_options_for(subset_url, endpoint_url)
    sub = read_manifest(subset_url, opts)
    info = sub.extra.get("subset")
    if not isinstance(info, dict):
        raise ValueError(f"{subset_url} is not a subset manifest (no extra.subset); write one with `largessl shards subset`")
    source_url = source_url or str(info.get("source_manifest", ""))
    source_opts = io.storage_options_for(source_url, endpoint_url)
    source = read_manifest(source_url, source_opts)
    if source.id != info.get("source_id"):
        raise ValueError(f"{subset_url} was drawn from a dataset with id {str(info.get('source_id'))[:12]}, but "
                         f"{source.url} has id {source.id[:12]}: the source changed")
    if sub.class_names != source.class_names:
        raise ValueError(f"{subset_url} and its source disagree on the class names")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        src_index = dict(enumerate(pool.map(lambda i: scan_shard(source, i, source_opts), range(len(source.shards)))))
        sub_index = list(pool.map(lambda i: scan_shard(sub, i, opts, verify_hash=True), range(len(sub.shards))))
    if info.get("method") == "list":
        if not info.get("list_file") or not os.path.isfile(info["list_file"]):
            expected = None  # the list is gone: the recorded keys hash still pins the selection
        else:
            if _file_sha256(info["list_file"]) != info.get("list_sha256"):
                raise ValueError(f"{info['list_file']} changed since {subset_url} was written")
            expected = select(source, src_index, SubsetRequest(list_file=info["list_file"]))
    else:
        expected = select(source, src_index, SubsetRequest(percent=float(info["percent"]), seed=int(info["seed"])))
    got = {(k, lab) for ix in sub_index for k, lab in zip(ix.keys, ix.labels)}
    source_labels = {k: lab for ix in src_index.values() for k, lab in zip(ix.keys, ix.labels)}
    foreign = sorted((k, lab) for k, lab in got if source_labels.get(k) != lab)
    if foreign:
        raise ValueError(f"{subset_url}: {len(foreign)} samples are not in {source.url} with the same label "
                         f"(e.g. {foreign[:3]})")
    keys = sorted(k for k, _ in got)
    if hashlib.sha256("\n".join(keys).encode()).hexdigest() != info.get("keys_sha256"):
        raise ValueError(f"{subset_url}: the samples in its shards are not the ones its manifest records")
    if expected is not None:
        want = {(src_index[s].keys[o], src_index[s].labels[o]) for s, o in expected}
        if got != want:
            extra, lost = sorted(got - want)[:3], sorted(want - got)[:3]
            raise ValueError(f"{subset_url} does not match the selection re-derived from {source.url} "
                             f"(unexpected {extra}, missing {lost})")
    log.info("subset %s verified: %d samples, shard hashes, keys and labels match its source", subset_url,
             sub.num_samples)
    return dict(info)

