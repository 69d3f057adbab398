"""`largessl bench knn` runs end to end on 2 gloo ranks at a tiny shape and reports what docs/benchmarks.md quotes."""

from __future__ import annotations

import json

import pytest

from largessl.bench.knn import PeakRSS
from largessl.cli import main


def test_bench_knn_small_shape(tmp_path):
    if not PeakRSS.available():
        pytest.skip("the benchmark's peak-memory measurement needs Linux /proc/self/clear_refs")
    out = tmp_path / "knn.json"
    assert main(["bench", "knn", "--train", "6000", "--queries", "300", "--dim", "32", "--classes", "10",
                 "--fraction", "0.5", "--ranks", "2", "--chunk", "64", "--block", "1024", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["measured"]
    assert (m["train"], m["queries"], m["ranks"]) == (3000, 150, 2) and len(m["per_rank"]) == 2
    assert all(r["predictions"] == 75 and r["seconds"] > 0 for r in m["per_rank"])
    full = res["extrapolated_full"]
    assert full["seconds_upper_bound"] == pytest.approx(m["seconds"] * 4)  # (1 / fraction)^2
    assert full["shard_bytes_per_rank"] == 6000 * 32 * 2 / 2
