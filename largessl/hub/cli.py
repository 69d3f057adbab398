"""``largessl hub push|list|show|pull|export|yank|pages``: publish, fetch and convert pretrained backbones.

    largessl hub push runs/bt --name bt-r50-in1k --version v1 [--hub s3://models/hub] [--full-checkpoint]
    largessl hub list
    largessl hub show bt-r50-in1k@v1          # or bt-r50-in1k / bt-r50-in1k@latest
    largessl hub pull bt-r50-in1k@v1 ./bt-r50
    largessl hub export bt-r50-in1k@v1 ./bt-r50-timm --format timm|hf|torchvision|detectron2
    largessl hub yank bt-r50-in1k@v1 --reason "trained on a manifest with duplicated val images"
    largessl hub pages                         # rewrite index.html and every model page

The hub URL defaults to $LARGESSL_HUB, else ``hub`` (a local directory). S3 endpoints come from
``--endpoint-url`` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from largessl.hub.weights import DEFAULT_HUB_ENV

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl hub``."""
    from largessl.hub.formats import FORMATS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", default=os.environ.get(DEFAULT_HUB_ENV, "hub"),
                        help="hub root: directory or fsspec URL (default: $LARGESSL_HUB or ./hub)")
    common.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    writer = argparse.ArgumentParser(add_help=False)
    writer.add_argument("--single-writer", action="store_true",
                        help="allow writing to a store without conditional writes (only one process ever writes)")
    yanked = argparse.ArgumentParser(add_help=False)
    yanked.add_argument("--allow-yanked", action="store_true", help="use a yanked version anyway (with a warning)")
    sub = parser.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    p = sub.add_parser("push", parents=[common, writer], help="export a run's backbone and publish it")
    p.add_argument("run_dir", help="run directory, its checkpoints/ folder or a step-N/ folder")
    p.add_argument("--name", default="", help="model name (default: <method>-<arch>)")
    p.add_argument("--version", default="", help="version (default: v<UTC timestamp>); versions are immutable")
    p.add_argument("--license", default="", help="license of the weights, e.g. apache-2.0 (default: hub.license "
                                                 "of the run's config, else 'unspecified')")
    p.add_argument("--full-checkpoint", action="store_true",
                   help="also publish the full training checkpoint (converted to safetensors + JSON)")
    sub.add_parser("list", parents=[common], help="published models and versions")
    p = sub.add_parser("show", parents=[common], help="print a version's verified model card")
    p.add_argument("ref", help="NAME[@VERSION]; no version = latest")
    p = sub.add_parser("pull", parents=[common, yanked], help="download a version after verifying every sha256")
    p.add_argument("ref", help="NAME[@VERSION]; no version = latest")
    p.add_argument("dest", help="new local directory")
    p.add_argument("--skip-pickles", action="store_true",
                   help="leave out pickled files of versions published by older largessl releases")
    p = sub.add_parser("export", parents=[common, yanked], help="write a version for timm, Hugging Face, "
                                                                "torchvision or detectron2")
    p.add_argument("ref", help="NAME[@VERSION] in the hub, or a folder written by `hub pull`")
    p.add_argument("dest", help="new local directory")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"one of: {', '.join(FORMATS)}")
    p = sub.add_parser("yank", parents=[common, writer], help="mark a version deprecated (it is never deleted)")
    p.add_argument("ref", help="NAME@VERSION")
    p.add_argument("--reason", required=True, help="what is wrong with it (shown to everyone who pulls it)")
    sub.add_parser("pages", parents=[common, writer], help="rewrite index.html and every model page")


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _list_line(r: dict) -> str:
    m = r["summary"].get("metrics", {})
    lin = m.get("linear_top1")
    knn = m.get("knn_top1") or {}
    lin_text = f"{lin:.2f}" if isinstance(lin, (int, float)) else "-"
    flags = (" (latest)" if r["latest"] else "") + (f" (yanked: {r['yanked'].get('reason', '')})" if r["yanked"] else "")
    return (f"{r['name']}@{r['version']}{flags}  {r['created']}  "
            f"{r['summary'].get('method', '?')} {r['summary'].get('arch', '?')}  "
            f"data {r['summary'].get('dataset') or '?'}  linear {lin_text}  "
            f"knn {', '.join(f'k={k}: {v:.2f}' for k, v in knn.items()) or '-'}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl hub``."""
    from largessl.hub.store import Hub

    writer = getattr(args, "single_writer", False)
    hub = Hub(args.hub, args.endpoint_url, single_writer=writer)
    if args.hub_command == "push":
        from largessl.hub.export import push_run

        card = push_run(args.run_dir, name=args.name, version=args.version,
                        include_full_checkpoint=args.full_checkpoint, license=args.license, hub=hub)
        ref = f"{card['name']}@{card['version']}"
        _print(f"published {ref} to {args.hub}")
        _print(f"load it with: largessl.hub.load_backbone({ref!r}, hub={args.hub!r})")
        return 0
    if args.hub_command == "list":
        rows = hub.list()
        if not rows:
            _print(f"no models in {args.hub}")
        for r in rows:
            _print(_list_line(r))
        return 0
    if args.hub_command == "show":
        _print(json.dumps(hub.show(args.ref), indent=1, sort_keys=True))
        return 0
    if args.hub_command == "export":
        from largessl.hub.formats import export_model

        out = export_model(args.ref, args.dest, args.format, hub=args.hub, endpoint_url=args.endpoint_url,
                           allow_yanked=args.allow_yanked)
        _print(f"exported {args.ref} as {args.format} into {out} (see {out / 'README.md'} to load it)")
        return 0
    if args.hub_command == "yank":
        rec = hub.yank(args.ref, args.reason)
        _print(f"yanked {args.ref} ({rec['at']}): {rec['reason']}; it stays downloadable with --allow-yanked, "
               "and NAME/NAME@latest now skip it")
        return 0
    if args.hub_command == "pages":
        hub.refresh_pages(None)
        _print(f"rewrote {args.hub}/index.html and its model pages")
        return 0
    dest = hub.pull(args.ref, args.dest, allow_yanked=args.allow_yanked, skip_pickles=args.skip_pickles)
    _print(f"pulled {args.ref} into {dest} (every sha256 verified)")
    return 0
