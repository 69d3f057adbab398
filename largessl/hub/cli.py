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

from largessl.hub.records import human_number as _num
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
    p.add_argument("--force", action="store_true", help="publish a run the collapse guard stopped (exit 5)")
    p.add_argument("--full-checkpoint", action="store_true",
                   help="also publish the full training checkpoint (converted to safetensors + JSON)")
    p = sub.add_parser("list", parents=[common], help="published models and versions (filter and sort)")
    p.add_argument("--method", default="", help="only this method (e.g. barlow_twins)")
    p.add_argument("--arch", default="", help="only this backbone (e.g. resnet50)")
    p.add_argument("--dataset", default="", help="only models trained on this data set (e.g. imagenet)")
    p.add_argument("--sort", default="", metavar="METRIC",
                   help=f"order by a metric, best first: {', '.join(SORT_KEYS)} (default: name, then version)")
    p = sub.add_parser("show", parents=[common], help="a version's verified model card: a summary (--json: all)")
    p.add_argument("ref", help="NAME[@VERSION]; no version = latest")
    p.add_argument("--json", action="store_true", help="the whole verified card as JSON")
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


SORT_KEYS = ("linear", "knn", "finetune", "created", "loss")
"""``hub list --sort``: linear top-1, best kNN top-1 over k, best fine-tune top-1, newest first, lowest loss."""


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _list_line(r: dict) -> str:
    m = r["summary"].get("metrics", {})
    knn = m.get("knn_top1") or {}
    flags = (" (latest)" if r["latest"] else "") + (f" (yanked: {r['yanked'].get('reason', '')})" if r["yanked"] else "")
    return (f"{r['name']}@{r['version']}{flags}  {r['created']}  "
            f"{r['summary'].get('method', '?')} {r['summary'].get('arch', '?')}  "
            f"data {r['summary'].get('dataset') or '?'}  epochs {_num(r['summary'].get('epochs'))}  "
            f"linear {_num(m.get('linear_top1'), 2)}  "
            f"knn {', '.join(f'k={k}: {_num(v, 2)}' for k, v in knn.items()) or '-'}")


def _best(value: object) -> float | None:
    """A metric as one number: itself, or the best of a per-k dict (kNN)."""
    if isinstance(value, dict):
        nums = [v for v in value.values() if isinstance(v, (int, float))]
        return max(nums) if nums else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sort_key(metric: str, row: dict) -> tuple:
    """Best first for ``hub list --sort``; rows without the metric go last."""
    m = row["summary"].get("metrics", {})
    if metric == "created":
        return (0, "".join(chr(0x10FFFF - ord(c)) for c in row["created"]))  # newest first
    if metric == "loss":
        v = _best(m.get("final_loss"))
        return (1, 0.0) if v is None else (0, v)
    key = {"linear": "linear_top1", "knn": "knn_top1"}.get(metric)
    if key is None:  # finetune: the best of the finetune_*pct_top1 stages
        vals = [_best(v) for k, v in m.items() if k.startswith("finetune") and k.endswith("_top1")]
        v = max((x for x in vals if x is not None), default=None)
    else:
        v = _best(m.get(key))
    return (1, 0.0) if v is None else (0, -v)


def filter_rows(rows: list[dict], method: str = "", arch: str = "", dataset: str = "") -> list[dict]:
    """Rows whose summary matches every given field (method exact, arch and dataset as substrings)."""
    out = []
    for r in rows:
        s = r["summary"]
        if method and s.get("method") != method:
            continue
        if arch and arch.lower() not in str(s.get("arch", "")).lower():
            continue
        if dataset and dataset.lower() not in str(s.get("dataset", "")).lower():
            continue
        out.append(r)
    return out


def card_summary(card: dict, hub_url: str) -> str:
    """What a person wants first from a card: the evaluation, what was trained on what, how to load it."""
    ref = f"{card.get('name', '?')}@{card.get('version', '?')}"
    lines = [ref + (f"  (YANKED: {card['yanked'].get('reason', '')})" if card.get("yanked") else "")]
    m = card.get("metrics", {})
    evals = []
    for key in sorted(m):
        if key.endswith("_top1"):
            stage = key[:-len("_top1")]
            v = m[key]
            text = (", ".join(f"k={k} {_num(x, 2)}" for k, x in v.items()) if isinstance(v, dict) else _num(v, 2))
            top5 = m.get(f"{stage}_top5")
            evals.append(f"{stage} top-1 {text}" + (f" (top-5 {_num(top5, 2)})" if top5 is not None else ""))
    arch = card.get("architecture", {})
    data = card.get("dataset", {})
    paper = card.get("paper", {})
    rows = [("evaluation", "; ".join(evals) or "none recorded"),
            ("method", f"{card.get('method', '?')}" + (f" — {paper['citation']}" if paper.get("citation") else "")),
            ("backbone", f"{arch.get('arch', '?')}" + (" (small input)" if arch.get("small_input") else "")
             + f", {arch.get('num_features', '?')} features"),
            ("data", str(data.get("name") or data.get("manifest_url") or "?")
             + (f", {data['num_samples']} images" if data.get("num_samples") else "")),
            ("trained", f"{_num(card.get('epochs'))} epochs, {card.get('step', '?')} steps"
             + (f", final loss {_num(m['final_loss'], 4)}" if "final_loss" in m else ""))]
    collapse = m.get("collapse") or {}
    if collapse:
        rows.append(("collapse", ", ".join(f"{k.removeprefix('collapse/')} {_num(v, 3)}"
                                           for k, v in sorted(collapse.items()))))
    diffs = paper.get("differences")
    if paper.get("recipe"):
        if diffs:
            shown = "; ".join(f"{d.get('key')} {d.get('paper')} → {d.get('run')}" for d in diffs[:8])
            more = f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""
            rows.append(("recipe", f"{paper['recipe']}, differs in {shown}{more}"))
        else:
            rows.append(("recipe", f"{paper['recipe']} (no differences)"))
    rows.append(("license", f"{card.get('license', '?')}, git {str(card.get('git_revision', '?'))[:12]}"))
    rows.append(("load", f"from largessl.hub import load_backbone; "
                         f"net, transform = load_backbone({ref!r}, hub={hub_url!r}, with_transform=True)"))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append(f"(the whole card: largessl hub show {ref} --hub {hub_url} --json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``largessl hub``."""
    from largessl.hub.store import Hub

    writer = getattr(args, "single_writer", False)
    hub = Hub(args.hub, args.endpoint_url, single_writer=writer)
    if args.hub_command == "push":
        from largessl.hub.export import push_run

        card = push_run(args.run_dir, name=args.name, version=args.version,
                        include_full_checkpoint=args.full_checkpoint, license=args.license, hub=hub,
                        force=args.force)
        ref = f"{card['name']}@{card['version']}"
        _print(f"published {ref} to {args.hub}")
        _print(f"load it with: largessl.hub.load_backbone({ref!r}, hub={args.hub!r})")
        return 0
    from_folder = args.hub_command == "export" and os.path.isdir(args.ref)  # a `hub pull` folder needs no hub
    if args.hub_command != "push" and not from_folder and not hub.exists_at_all():
        raise ValueError(f"no hub at {args.hub} (no index.json there): check the path or --hub "
                         f"(${DEFAULT_HUB_ENV}); a hub is created by its first `largessl hub push`")
    if args.hub_command == "list":
        if args.sort and args.sort not in SORT_KEYS:
            raise ValueError(f"unknown --sort {args.sort!r}; one of: {', '.join(SORT_KEYS)}")
        every = hub.list()
        if not every:
            raise ValueError(f"hub {args.hub} has no models")
        rows = filter_rows(every, args.method, args.arch, args.dataset)
        if args.sort:
            rows = sorted(rows, key=lambda r: sort_key(args.sort, r))
        if not rows:
            _print(f"none of the {len(every)} versions in {args.hub} match the filters")
        for r in rows:
            _print(_list_line(r))
        return 0
    if args.hub_command == "show":
        card = hub.show(args.ref)
        _print(json.dumps(card, indent=1, sort_keys=True) if args.json else card_summary(card, hub.url))
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
