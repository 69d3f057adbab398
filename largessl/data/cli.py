"""``largessl shards``: write WebDataset shards + indexes + manifest, verify or index them, or write an embedded set.

    largessl shards write SRC DEST [--shard-size 256MB] [--workers 8] [--overwrite]
    largessl shards verify MANIFEST
    largessl shards index MANIFEST
    largessl shards digits DEST [--image-size 32]
    largessl shards photodigits DEST [--image-size 32] [--copies 1]
    largessl shards subset SRC_MANIFEST DEST (--percent 10 [--seed 0] | --list 10percent.txt) [--verify]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor

from largessl.data import io

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``'256MB'`` → 256000000, ``'1GiB'`` → 1073741824, ``'4096'`` → 4096."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; use e.g. 256MB, 1GiB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``largessl shards``."""
    sub = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    w = sub.add_parser("write", help="convert an ImageFolder tree or a 'PATH LABEL' list file into shards")
    w.add_argument("src", help="ImageFolder directory (one sub-directory per class) or list file")
    w.add_argument("dest", help="destination folder URL: path, file://, s3://bucket/prefix, gs://...")
    w.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    w.add_argument("--workers", type=int, default=8, help="shards written in parallel (default 8)")
    w.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    w.add_argument("--no-shuffle", action="store_true",
                   help="keep the sorted source order in the shards (default: one seeded shuffle, so every "
                        "shard mixes classes)")
    w.add_argument("--seed", type=int, default=0, help="seed of the write-time shuffle")
    w.add_argument("--overwrite", action="store_true", help="replace an existing complete dataset at DEST")
    w.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="re-hash every shard of a manifest against its sha256")
    v.add_argument("manifest", help="manifest URL")
    v.add_argument("--workers", type=int, default=8)
    v.add_argument("--endpoint-url", default="")
    x = sub.add_parser("index", help="add per-shard sample-offset indexes (.idx) and wids' shardindex.json to "
                                     "a dataset written without them (reads every shard once)")
    x.add_argument("manifest", help="manifest URL")
    x.add_argument("--workers", type=int, default=8)
    x.add_argument("--endpoint-url", default="")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("digits", help="write scikit-learn's digits as train/val shards (no download)")
    d.add_argument("dest", help="destination folder URL")
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--val-fraction", type=float, default=0.2)
    d.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("photodigits", help="write the digits blended with patches of photographs (MNIST-M's "
                                           "construction; no download) as train/val shards: docs/data.md")
    p.add_argument("dest", help="destination folder URL")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2, help="glyphs held out for val (per class)")
    p.add_argument("--copies", type=int, default=1, help="draws of every glyph on independent random patches")
    p.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("subset", help="write a label subset (1%%/10%%: seeded class-balanced draw or an image list) "
                                      "as its own shards + manifest; rerun to reuse or --verify it")
    s.add_argument("src", help="manifest URL of the labelled dataset to draw from")
    s.add_argument("dest", help="destination folder URL of the subset")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--percent", type=float, help="keep this percent of every class (class-balanced, seeded)")
    how.add_argument("--list", dest="list_file", help="image list file (SimCLR's 1percent.txt) or shard keys, one a line")
    s.add_argument("--seed", type=int, default=0, help="seed of the class-balanced draw (default 0)")
    s.add_argument("--source-root", default="",
                   help="ImageFolder the shards were written from, to resolve image names of --list "
                        "(default: the source recorded in the manifest)")
    s.add_argument("--shard-size", default="256MB", help="target size of the subset's shards")
    s.add_argument("--workers", type=int, default=8, help="shards read/written in parallel")
    s.add_argument("--verify", action="store_true",
                   help="afterwards re-derive the selection from SRC and check the subset's keys, labels and hashes")
    s.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _verify(manifest_url: str, workers: int, endpoint_url: str) -> int:
    from largessl.data.manifest import read_manifest

    opts = io.storage_options_for(manifest_url, endpoint_url)
    manifest = read_manifest(manifest_url, opts)

    def digest(url: str) -> str:
        h = hashlib.sha256()
        with io.open_url(url, "rb", opts) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        got = list(pool.map(digest, [s.url for s in manifest.shards]))
    bad = [s.url for s, g in zip(manifest.shards, got) if s.sha256 and g != s.sha256]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(manifest.shards)} shards do not match their sha256: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}; rewrite them with `largessl shards write --overwrite`")
    log.info("all %d shards of %s match their sha256", len(manifest.shards), manifest_url)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``largessl shards ACTION``."""
    if args.shards_command == "write":
        from largessl.data.writer import write_source

        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1 (got {args.workers})")
        url = write_source(args.src, args.dest, shard_bytes=parse_size(args.shard_size), prefix=args.prefix,
                           workers=args.workers, overwrite=args.overwrite,
                           storage_options=io.storage_options_for(args.dest, args.endpoint_url),
                           progress=not args.no_progress, shuffle_seed=None if args.no_shuffle else args.seed)
        print(url)
        return 0
    if args.shards_command == "verify":
        return _verify(args.manifest, args.workers, args.endpoint_url)
    if args.shards_command == "index":
        from largessl.data.writer import index_dataset

        index_dataset(args.manifest, io.storage_options_for(args.manifest, args.endpoint_url), args.workers,
                      progress=not args.no_progress)
        return 0
    if args.shards_command == "digits":
        from largessl.data.digits import write_digits_shards

        train, val = write_digits_shards(args.dest, args.image_size, args.val_fraction, args.seed, progress=True)
        print(train)
        print(val)
        return 0
    if args.shards_command == "photodigits":
        from largessl.data.photodigits import write_photodigits_shards

        train, val = write_photodigits_shards(args.dest, args.image_size, args.val_fraction, args.copies, args.seed,
                                              progress=True)
        print(train)
        print(val)
        return 0
    if args.shards_command == "subset":
        from largessl.data.subset import SubsetRequest, build_subset, verify_subset

        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1 (got {args.workers})")
        request = SubsetRequest(percent=args.percent or 0.0, seed=args.seed, list_file=args.list_file or "",
                                source_root=args.source_root)
        url = build_subset(args.src, args.dest, request, workers=args.workers, shard_bytes=parse_size(args.shard_size),
                           endpoint_url=args.endpoint_url, progress=not args.no_progress)
        if args.verify:
            verify_subset(url, args.src, args.workers, args.endpoint_url)
        print(url)
        return 0
    raise ValueError(f"unknown shards action {args.shards_command!r}")
