"""Sample-offset indexes of tar shards, in the formats other WebDataset readers use.

Two files are written beside the shards by ``largessl shards write`` (and ``largessl shards index``):

- **Per shard, ``NAME.idx``**: DALI's webdataset index, version ``v1.2`` (the format of DALI's
  ``wds2idx`` tool, read by ``nvidia.dali.fn.readers.webdataset(index_paths=...)``). Text: a first line
  ``v1.2 <number of samples>``, then one line per sample listing each of its tar members as
  ``<ext> <data offset> <size> <member name>``, separated by spaces. The data offset is the byte offset
  of the member's payload (just after its 512-byte header), so it is a multiple of 512. The streams use
  it to seek: the header of a sample's first member starts 512 bytes before its payload (shards are
  written in plain USTAR, one header block per member).
- **Per dataset, ``shardindex.json``**: the ``wids`` shard index (``__kind__: wids-shard-index-v1``,
  ``wids_version: 1``, ``shardlist: [{url, nsamples, filesize}]`` with URLs relative to the file), so
  ``wids.ShardListDataset("DEST/shardindex.json")`` indexes the dataset by sample. wids builds its
  per-member offsets itself when it opens a shard (it maps the tar and walks the headers); its other
  per-shard file, a pickled ``.index``, is not written: loading a pickle runs arbitrary code.

Member names go in the index as they are, so they must not contain whitespace; keys written by
largessl never do.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

INDEX_VERSION = "v1.2"
WIDS_INDEX_NAME = "shardindex.json"
WIDS_KIND = "wids-shard-index-v1"
BLOCK = 512


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: extension, payload offset and size in the tar, full member name."""

    ext: str
    offset: int
    size: int
    name: str


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one shard starts: the byte offset of its first member's header, and its key."""

    headers: list[int]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.headers)


def index_name(shard_name: str) -> str:
    """``shard-000001.tar`` → ``shard-000001.idx`` (DALI's naming: the name up to its first dot)."""
    head, _, base = shard_name.rpartition("/")
    stem = base.split(".", 1)[0] or base
    return f"{head}/{stem}.idx" if head else f"{stem}.idx"


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext.more`` → (``dir/key``, ``ext.more``); the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def format_index(samples: Sequence[Sequence[Member]]) -> bytes:
    """The ``.idx`` text for ``samples`` (each a list of its members in tar order)."""
    if not samples:
        raise ValueError("a shard index needs at least one sample (DALI rejects a count of 0)")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        if not members:
            raise ValueError("every sample of a shard index needs at least one member")
        parts = []
        for m in members:
            if m.offset % BLOCK:
                raise ValueError(f"member {m.name} starts at {m.offset}, not on a {BLOCK}-byte tar block")
            if not m.name or any(c.isspace() for c in m.name) or not m.ext or any(c.isspace() for c in m.ext):
                raise ValueError(f"member name {m.name!r} cannot go in a shard index: it is empty or holds whitespace")
            parts.append(f"{m.ext} {m.offset} {m.size} {m.name}")
        lines.append(" ".join(parts))
    return ("\n".join(lines) + "\n").encode()


def parse_index(text: bytes, where: str = "<index>") -> ShardIndex:
    """Read a ``.idx`` file (DALI v1.2, which names the members; v1.0/v1.1 lack the names we check against)."""
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"shard index {where} is not ASCII text") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"shard index {where} starts with {lines[0][:40] if lines else ''!r}, "
                         f"expected '{INDEX_VERSION} <samples>'")
    n = int(head[1])
    if len(lines) - 1 < n:
        raise ValueError(f"shard index {where} promises {n} samples but lists {len(lines) - 1}")
    headers, keys = [], []
    for i, line in enumerate(lines[1:n + 1], 1):
        tok = line.split()
        if not tok or len(tok) % 4:
            raise ValueError(f"shard index {where} line {i + 1}: expected '<ext> <offset> <size> <name>' groups")
        try:
            offset = int(tok[1])
        except ValueError:
            raise ValueError(f"shard index {where} line {i + 1}: offset {tok[1]!r} is not an integer") from None
        if offset < BLOCK or offset % BLOCK:
            raise ValueError(f"shard index {where} line {i + 1}: offset {offset} is not a payload offset")
        headers.append(offset - BLOCK)
        keys.append(split_member(tok[3])[0])
    if any(b <= a for a, b in zip(headers, headers[1:])):
        raise ValueError(f"shard index {where}: sample offsets do not increase")
    return ShardIndex(headers, keys)


def scan_members(f: IO[bytes]) -> list[list[Member]]:
    """Members of each sample of an existing tar shard (read front to back; payloads are skipped)."""
    samples: list[list[Member]] = []
    key = None
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, ext = split_member(m.name)
            if k != key:
                samples.append([])
                key = k
            samples[-1].append(Member(ext, m.offset_data, m.size, m.name))
    return samples


def wids_shard_index(rows: Iterable[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """wids' dataset description for shards ``rows`` (``url`` relative to the index file, ``num_samples``, ``bytes``)."""
    shardlist = []
    for r in rows:
        entry: dict[str, Any] = {"url": str(r["url"]), "nsamples": int(r["num_samples"])}
        if r.get("bytes"):
            entry["filesize"] = int(r["bytes"])
        shardlist.append(entry)
    return {"__kind__": WIDS_KIND, "wids_version": 1, "name": name, "shardlist": shardlist}

