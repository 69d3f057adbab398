"""The hub's pages in headless Chromium (Debian ``chromium``): index → model pages, no sideways scroll at 1,280 px.

Screenshots are written to ``$LARGESSL_KEEP_SCREENSHOTS`` (a directory) when set, for people to look at.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hub_runs import make_run_dir
from PIL import Image

from largessl.hub import Hub
from largessl.hub.export import push_run
from largessl.hub.records import INDEX_HTML, PAGES_DIR

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
           "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


# Appended to a copy of a page: records the layout width and every element that scrolls sideways.
_PROBE = """<script>
const wide = [...document.querySelectorAll('*')].filter(e => {
  const s = getComputedStyle(e);
  return e.scrollWidth > e.clientWidth + 1 && (s.overflowX === 'auto' || s.overflowX === 'scroll');
}).map(e => e.tagName);
document.body.setAttribute('data-probe', JSON.stringify({scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth, scrollers: wide, links: [...document.links].map(a => a.getAttribute('href'))}));
</script>"""


def _measure(chromium: str, page: Path, tmp: Path, width: int = 1280) -> dict:
    probe = page.with_name(f".probe-{page.name}")  # same folder: relative links and sizes as the real page
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    try:
        r = _chromium(chromium, tmp / f"profile-{page.stem}", f"--window-size={width},900", "--dump-dom",
                      probe.resolve().as_uri())
    finally:
        probe.unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert m, r.stdout[-2000:]
    return json.loads(html.unescape(m.group(1)))


def _screenshot(chromium: str, page: Path, tmp: Path, name: str, height: int) -> Image.Image:
    png = tmp / f"{name}.png"
    shot = _chromium(chromium, tmp / f"profile-shot-{name}", f"--screenshot={png}", f"--window-size=1280,{height}",
                     page.resolve().as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    keep = os.environ.get("LARGESSL_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(keep) / png.name)
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, height)
    return img


def _hub(tmp_path: Path) -> Path:
    """Two models; one with three versions (evaluations incl. fine-tuning, one yanked) and long values."""
    from largessl.data.manifest import write_manifest

    manifest = tmp_path / "datasets" / "imagenet-1k-with-a-rather-long-bucket-prefix" / "train" / "manifest.json"
    write_manifest(str(manifest), [{"url": "train-000000.tar", "num_samples": 1281167}], ["n01440764"])
    run_dir = make_run_dir(tmp_path / "run", overrides=[f"data.train_manifest={manifest}", "hub.license=apache-2.0"])
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "linear.json").write_text(json.dumps({"top1": 93.25, "top5": 99.5, "protocol": "cached_features",
                                                             "epochs": 100, "lr": 0.02, "num_train": 1437,
                                                             "num_val": 360}))
    (run_dir / "eval" / "knn.json").write_text(json.dumps({"top1": {"20": 91.5, "200": 88.0}, "k": [20, 200],
                                                          "temperature": 0.07}))
    (run_dir / "eval" / "finetune_10pct.json").write_text(json.dumps({"top1": 95.0, "top5": 99.9, "epochs": 30}))
    hub = tmp_path / "hub"
    for v in ("v1", "v2", "v3-with-a-long-version-name-2026-01-02"):
        push_run(run_dir, str(hub), name="bt-r18-digits", version=v)
    Hub(str(hub)).yank("bt-r18-digits@v2", "evaluated on a val split that overlapped the training shards; use v3")
    imagenet = make_run_dir(tmp_path / "run2", small_input=False, overrides=["method.name=vicreg"], seed=2)
    push_run(imagenet, str(hub), name="vicreg-r18", version="v1", license="cc-by-nc-4.0")
    return hub


def test_pages_render_link_and_fit_1280px_in_headless_chromium(chromium, tmp_path):
    hub = _hub(tmp_path)
    index = hub / INDEX_HTML
    pages = {n: hub / PAGES_DIR / f"{n}.html" for n in ("bt-r18-digits", "vicreg-r18")}

    dom = _chromium(chromium, tmp_path / "profile-dom", "--window-size=1280,900", "--dump-dom", index.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "bt-r18-digits" in dom.stdout and "93.2" in dom.stdout and "<polyline" in dom.stdout
    for name, page in pages.items():
        probe = _measure(chromium, page, tmp_path)
        assert probe["innerWidth"] == 1280 and probe["scrollWidth"] <= 1280, (name, probe)
        assert probe["scrollers"] == [], (name, probe)  # no element scrolls sideways either
        assert "../index.html" in probe["links"]
    probe = _measure(chromium, index, tmp_path)
    assert probe["scrollWidth"] <= 1280 and probe["scrollers"] == [], probe
    for name in pages:  # the index links every model page, relatively (works from a bucket)
        assert f"{PAGES_DIR}/{name}.html" in probe["links"]

    text = pages["bt-r18-digits"].read_text()
    for needle in ("imagenet-1k-with-a-rather-long-bucket-prefix", "manifest sha256", "Zbontar", "2103.03230",
                   "train.epochs", "fine-tuning with 10% of the labels", "apache-2.0", "0123456789abcdef",
                   "--format torchvision", "not available: this backbone has the small-input stem",
                   "evaluated on a val split that overlapped",
                   'id="v-v1"', 'id="v-v2"', 'id="v-v3-with-a-long-version-name-2026-01-02"', "skipped data"):
        assert needle in text, needle
    text = pages["vicreg-r18"].read_text()
    for needle in ("VICReg", "cc-by-nc-4.0", "--format timm", "--format hf", "--format detectron2",
                   "No evaluation results were recorded"):
        assert needle in text, needle

    img = _screenshot(chromium, pages["bt-r18-digits"], tmp_path, "model-page", 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and curves, not a blank page
    blue = sum(n for n, (r, g, b) in colours if b > 180 and r < 60 and 80 < g < 140)  # curves and links (#0969da)
    red = sum(n for n, (r, g, b) in colours if r > 190 and g < 80 and b < 90)  # the yanked badge (#cf222e)
    assert blue > 200 and red > 20, (blue, red)
    img = _screenshot(chromium, index, tmp_path, "index", 1000)
    assert len(img.getcolors(maxcolors=1 << 20) or []) > 50
