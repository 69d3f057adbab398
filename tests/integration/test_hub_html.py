"""The hub's index.html renders in headless Chromium (Debian ``chromium``): table, metrics, loss curves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hub_runs import make_run_dir
from PIL import Image

from largessl.hub.export import push_run
from largessl.hub.store import INDEX_HTML

_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _find() -> str | None:
    return next((shutil.which(n) for n in _NAMES if shutil.which(n)), None)


def _install() -> str:
    """Install Debian's chromium with apt (root only); returns why it failed, or '' on success."""
    if not shutil.which("apt-get"):
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "installing chromium needs root (apt-get install -y chromium)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)} failed: {e}"
        if r.returncode != 0:
            return f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-300:]}"
    return ""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable Chromium, installed with apt when missing; skips with the reason otherwise."""
    path = _find()
    if path is None:
        why = _install()
        path = _find()
        if path is None:
            reason = f"headless Chromium is not installable here: {why or 'no chromium binary after apt-get install'}"
            print(reason)
            pytest.skip(reason)
    return path


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_index_html_renders_in_headless_chromium(chromium, tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "linear.json").write_text(json.dumps({"top1": 93.25, "top5": 99.5}))
    (run_dir / "eval" / "knn.json").write_text(json.dumps({"top1": {"20": 91.5, "200": 88.0}}))
    hub = tmp_path / "hub"
    push_run(run_dir, str(hub), name="bt-r18-digits", version="v1")
    push_run(run_dir, str(hub), name="bt-r18-digits", version="v2")
    page = (hub / INDEX_HTML).resolve().as_uri()

    dom = _chromium(chromium, tmp_path / "profile1", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<tr>") == 3  # header + two versions
    assert "bt-r18-digits" in dom.stdout and "93.2" in dom.stdout and "<polyline" in dom.stdout

    png = tmp_path / "index.png"
    shot = _chromium(chromium, tmp_path / "profile2", f"--screenshot={png}", "--window-size=1600,500",
                     "--hide-scrollbars", page)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    keep = os.environ.get("LARGESSL_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(png, keep)
    img = Image.open(png).convert("RGB")
    assert img.size == (1600, 500)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, borders and curves, not a blank page
    # the loss curves' stroke colour (#0969da, anti-aliased) is on the page
    blue = sum(n for n, (r, g, b) in colours if b > 180 and r < 60 and 80 < g < 140)
    assert blue > 50
