"""``largessl hub push|list|show|pull``: publish and fetch pretrained backbones.

    largessl hub push runs/bt --name bt-r50-in1k --version v1 [--hub s3://models/hub] [--full-checkpoint]
    largessl hub list
    largessl hub show bt-r50-in1k@v1          # or bt-r50-in1k / bt-r50-in1k@latest
    largessl hub pull bt-r50-in1k@v1 ./bt-r50

The hub URL defaults to $LARGESSL_HUB, else ``hub`` (a local directory). S3 endpoints come from
``--endpoint-url`` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from largessl.hub.api import DEFAULT_HUB_ENV

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl hub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", default=os.environ.get(DEFAULT_HUB_ENV, "hub"),
                        help="hub root: directory or fsspec URL (default: $LARGESSL_HUB or ./hub)")
    common.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    sub = parser.add_subparsers(dest="hub_command", metavar="ACTION", required=True)
    p = sub.add_parser("push", parents=[common], help="export a run's backbone and publish it")
    p.add_argument("run_dir", help="run directory, its checkpoints/ folder or a step-N/ folder")
    p.add_argument("--name", default="", help="model name (default: <method>-<arch>)")
    p.add_argument("--version", default="", help="version (default: v<UTC timestamp>); versions are immutable")
    p.add_argument("--full-checkpoint", action="store_true", help="also publish the full training checkpoint")
    sub.add_parser("list", parents=[common], help="published models and versions")
    p = sub.add_parser("show", parents=[common], help="print a version's verified model card")
    p.add_argument("ref", help="NAME[@VERSION]; no version = latest")
    p = sub.add_parser("pull", parents=[common], help="download a version after verifying every sha256")
    p.add_argument("ref", help="NAME[@VERSION]; no version = latest")
    p.add_argument("dest", help="new local directory")


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl hub``."""
    from largessl.hub.store import Hub

    if args.hub_command == "push":
        from largessl.hub.export import push_run

        card = push_run(args.run_dir, args.hub, args.name, args.version, args.endpoint_url, args.full_checkpoint)
        ref = f"{card['name']}@{card['version']}"
        _print(f"published {ref} to {args.hub}")
        _print(f"load it with: largessl.hub.load_backbone({ref!r}, hub={args.hub!r})")
        return 0
    hub = Hub(args.hub, args.endpoint_url)
    if args.hub_command == "list":
        rows = hub.list()
        if not rows:
            _print(f"no models in {args.hub}")
        for r in rows:
            m = r["summary"].get("metrics", {})
            lin = m.get("linear_top1")
            knn = m.get("knn_top1") or {}
            lin_text = f"{lin:.2f}" if isinstance(lin, (int, float)) else "-"
            _print(f"{r['name']}@{r['version']}{' (latest)' if r['latest'] else ''}  {r['created']}  "
                   f"{r['summary'].get('method', '?')} {r['summary'].get('arch', '?')}  "
                   f"linear {lin_text}  "
                   f"knn {', '.join(f'k={k}: {v:.2f}' for k, v in knn.items()) or '-'}")
        return 0
    if args.hub_command == "show":
        _print(json.dumps(hub.show(args.ref), indent=1, sort_keys=True))
        return 0
    dest = hub.pull(args.ref, args.dest)
    _print(f"pulled {args.ref} into {dest} (every sha256 verified)")
    return 0
