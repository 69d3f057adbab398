"""Processes for the hub concurrency tests: pushers and a reader, spawned fresh and released together.

Spawned, not forked: the test process holds threads (s3fs's event loop, torch's pools), and a fork taken
while one of them holds a lock leaves the child waiting on it forever (seen here under load: 8 pushers
stuck in a futex).

Each worker waits at a shared ``go`` barrier (so the pushes overlap), does its work, and writes what
happened to a JSON file. Each child is a separate process with its own hub client, storage connections
and locks; the barrier is passed only once all have imported what they need.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any


def push(hub_url: str, go: Any, out: str, run_dir: str, refs: list[str]) -> None:
    """Push ``run_dir`` as each NAME@VERSION in turn; record ok or the error per push."""
    from largessl.hub.export import push_run

    results = []
    go.wait()  # every worker has imported what it needs: they all start pushing at once
    for ref in refs:
        name, version = ref.split("@")
        t0 = time.time()
        try:
            card = push_run(run_dir, hub_url, name=name, version=version, license="test")
            results.append({"ref": ref, "ok": True, "sha256": card["files"]["backbone.safetensors"]["sha256"],
                            "t0": t0, "t1": time.time()})
        except Exception as e:  # recorded for the test to judge
            results.append({"ref": ref, "ok": False, "type": type(e).__name__, "error": str(e), "t0": t0,
                            "t1": time.time()})
    Path(out).write_text(json.dumps(results))


def read(hub_url: str, go: Any, out: str, stop: Any) -> None:
    """Until ``stop`` is set: list the hub and fully verify every listed version; record every failure."""
    from largessl.hub import Hub

    hub = Hub(hub_url)
    rounds, checked, failures, seen = 0, 0, [], set()
    go.wait()
    while True:
        last = stop.is_set()
        try:
            for row in hub.list():
                ref = f"{row['name']}@{row['version']}"
                hub.read_verified(ref)  # the card against the index, every file against the card
                seen.add(ref)
                checked += 1
        except Exception:
            failures.append(traceback.format_exc(limit=4))
        rounds += 1
        if last:
            break
    Path(out).write_text(json.dumps({"rounds": rounds, "checked": checked, "failures": failures,
                                     "seen": sorted(seen)}))


def run_workers(hub_url: str, jobs: list[tuple[str, list[str]]], tmp: Path) -> tuple[list[dict], dict]:
    """Spawn one pusher per (run dir, refs) job plus a reader, start them together, wait, return their reports."""
    ctx = mp.get_context("spawn")
    go, stop = ctx.Barrier(len(jobs) + 2), ctx.Event()  # the workers and this process
    pushers = [ctx.Process(target=push, args=(hub_url, go, str(tmp / f"push{i}.json"), run_dir, refs))
               for i, (run_dir, refs) in enumerate(jobs)]
    reader = ctx.Process(target=read, args=(hub_url, go, str(tmp / "read.json"), stop))
    for p in [*pushers, reader]:
        p.start()
    go.wait(timeout=300)
    for p in pushers:
        p.join(timeout=600)
        assert p.exitcode == 0, f"pusher exited with {p.exitcode}"
    stop.set()
    reader.join(timeout=600)
    assert reader.exitcode == 0, f"reader exited with {reader.exitcode}"
    pushes = [r for i in range(len(jobs)) for r in json.loads((tmp / f"push{i}.json").read_text())]
    return pushes, json.loads((tmp / "read.json").read_text())
