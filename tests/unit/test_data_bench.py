"""`largessl bench data` runs end to end on a tiny set and reports both pipelines and their ratio."""

from __future__ import annotations

import json
from pathlib import Path

from largessl.bench.data import make_imagenet_like
from largessl.cli import main


def test_imagenet_like_images_are_real_photos_of_the_right_size(tmp_path: Path) -> None:
    from PIL import Image

    stats = make_imagenet_like(tmp_path, 8)
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 8 and stats["mean_kb"] > 40
    sizes = {Image.open(f).size for f in files}
    assert sizes <= {(500, 375), (375, 500)}
    # photographs, not flat or noise images: neighbouring pixels are strongly correlated
    import numpy as np

    a = np.asarray(Image.open(files[0]).convert("L"), dtype=np.float32)
    assert a.std() > 10
    assert np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] > 0.8


def test_bench_data_cli(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--images", "16", "--batch-size", "4", "--image-size", "32", "--rounds", "1",
                 "--workdir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["largessl_views_per_s_per_core"] > 0 and res["baseline_views_per_s_per_core"] > 0
    assert abs(res["speedup"] - res["largessl_views_per_s_per_core"] / res["baseline_views_per_s_per_core"]) < 0.05
