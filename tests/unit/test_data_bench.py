"""`largessl bench data` runs end to end on a tiny set and reports every mode side by side with its ratio."""

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
    import torch

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--images", "16", "--batch-size", "4", "--image-size", "32", "--rounds", "1",
                 "--decoders", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    modes = res["modes"]
    expected = {"baseline", "cpu", "cpu_pil", "batched_cpu"} | ({"batched_gpu"} if torch.cuda.is_available() else set())
    assert set(modes) == expected
    base = modes["baseline"]["views_per_s_per_core"]
    for name in expected - {"batched_gpu"}:
        row = modes[name]
        assert row["views_per_s_per_core"] > 0
        # one round: the ratio is exactly the ratio of the two rows (up to rounding)
        assert abs(row["vs_baseline"] - row["views_per_s_per_core"] / base) < 0.02 * row["vs_baseline"] + 0.01
    assert res["largessl_views_per_s_per_core"] == modes["cpu"]["views_per_s_per_core"]
    assert res["speedup"] == modes["cpu"]["vs_baseline"]
    assert res["decoders"]["pil"]["full_ms"] > 0 and res["decoders"]["pil"]["half_ms"] > 0
    assert set(res["decoders"]) == {"pil", "simplejpeg", "opencv", "turbojpeg"}


def test_bench_data_rejects_unknown_modes(tmp_path: Path) -> None:
    import pytest

    from largessl.bench.data import run_bench

    with pytest.raises(ValueError, match="must include baseline"):
        run_bench(16, 4, 32, modes=("cpu",), workdir=str(tmp_path))
    with pytest.raises(ValueError, match="must include baseline"):
        run_bench(16, 4, 32, modes=("baseline", "tpu"), workdir=str(tmp_path))
