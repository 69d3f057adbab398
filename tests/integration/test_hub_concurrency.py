"""Concurrent publishing: 8 pushing processes, 4 model names, one hub (SeaweedFS S3, and a local directory).

Each process first pushes NAME@v1 where another process pushes the same version at the same time (so
exactly one of each pair may win), then a version of its own. Meanwhile a reader process lists the hub
and fully verifies every listed version, over and over. Afterwards: every successful push is listed with
the weights of the process that made it, each loser got the "written once" error, no reader ever saw a
listed version that failed verification, and the pages show every version.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_runs import make_run_dir
from hub_workers import run_workers

from largessl.hub import Hub
from largessl.hub.records import BACKBONE, CLAIMS_DIR, INDEX_HTML, PAGES_DIR
from largessl.hub.store import sha256_file

NAMES = ("alpha", "beta", "gamma", "delta")
N_PROCS = 8


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> list[Path]:
    """One tiny run per process (different weights, so a published version names its pusher)."""
    base = tmp_path_factory.mktemp("runs")
    dirs = [make_run_dir(base / f"run{i}", arch="repro_convnet", small_input=False, seed=i) for i in range(N_PROCS)]
    return dirs


def _backbone_sha(run_dir: Path, tmp: Path) -> str:
    from largessl.hub.export import export_run

    files, _, _ = export_run(run_dir, tmp)
    return sha256_file(files[BACKBONE])


def _run(hub_url: str, run_dirs: list[Path], tmp: Path) -> tuple[list[dict], dict]:
    jobs = [(str(run_dirs[i]), [f"{NAMES[i % 4]}@v1", f"{NAMES[i % 4]}@p{i}"]) for i in range(N_PROCS)]
    return run_workers(hub_url, jobs, tmp)


def _check(hub_url: str, run_dirs: list[Path], pushes: list[dict], reads: dict, tmp: Path) -> Hub:
    t = min(p["t0"] for p in pushes)
    for p in sorted(pushes, key=lambda p: p["t0"]):  # shown when the test fails: who overlapped with whom
        print(f"{p['ref']:10s} ok={p['ok']!s:5s} {p['t0'] - t:6.2f}s → {p['t1'] - t:6.2f}s {p.get('error', '')[:90]}")
    print(f"reader: {reads['rounds']} rounds, {reads['checked']} versions verified")
    shas = [_backbone_sha(d, tmp / f"sha{i}") for i, d in enumerate(run_dirs)]
    hub = Hub(hub_url)
    listed = {f"{r['name']}@{r['version']}" for r in hub.list()}
    ok = [p for p in pushes if p["ok"]]
    # every own version was published and is listed
    assert {f"{NAMES[i % 4]}@p{i}" for i in range(N_PROCS)} <= {p["ref"] for p in ok}
    # each contested v1: exactly one winner, the other push got the clear error
    for name in NAMES:
        contested = [p for p in pushes if p["ref"] == f"{name}@v1"]
        assert len(contested) == 2 and sum(p["ok"] for p in contested) == 1, contested
        loser = next(p for p in contested if not p["ok"])
        assert loser["type"] == "ValueError", loser
        assert "written once" in loser["error"] or "already exists" in loser["error"], loser["error"]
    assert listed == {p["ref"] for p in ok} and len(listed) == N_PROCS + len(NAMES)
    # each listed version holds exactly the weights its winning process pushed, verified end to end
    for p in ok:
        card, files = hub.read_verified(p["ref"], [BACKBONE])
        assert card["files"][BACKBONE]["sha256"] == p["sha256"] and p["sha256"] in shas
    # the reader never saw a listed version that was incomplete or failed verification
    assert reads["failures"] == [], reads["failures"][0]
    assert reads["rounds"] >= 2 and reads["checked"] > 0
    # pages: the index links every model, every model page lists all its versions
    html = hub.storage.read(INDEX_HTML).decode()
    for name in NAMES:
        assert f"{PAGES_DIR}/{name}.html" in html
        page = hub.storage.read(f"{PAGES_DIR}/{name}.html").decode()
        for ref in listed:
            if ref.startswith(name + "@"):
                assert f'id="v-{ref.split("@")[1]}"' in page, (name, ref)
    return hub


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_concurrent_pushes_on_s3(s3_server, run_dirs, tmp_path, monkeypatch):
    hub_url = s3_server.url("hub-concurrency")
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)  # before the fork: the workers read AWS_* like any user's process
    pushes, reads = _run(hub_url, run_dirs, tmp_path)
    _check(hub_url, run_dirs, pushes, reads, tmp_path)
    # every claim was released
    fs = s3_server.filesystem()
    root = hub_url[len("s3://"):]
    fs.invalidate_cache()
    assert [p for p in fs.find(f"{root}/{CLAIMS_DIR}") if p.endswith(".json")] == []


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_concurrent_pushes_on_a_local_directory(run_dirs, tmp_path):
    hub_dir = tmp_path / "hub"
    pushes, reads = _run(str(hub_dir), run_dirs, tmp_path)
    _check(str(hub_dir), run_dirs, pushes, reads, tmp_path)
    leftovers = [p.name for p in hub_dir.glob("models/*/.staging-*")]
    assert leftovers == []
