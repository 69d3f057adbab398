"""DALI, NVIDIA's GPU data loader, reads our shards through our per-shard .idx files.

It lives in the GPU tier because DALI is a 1.1 GB CUDA wheel that only GPU machines install
(``pip install nvidia-dali-cuda120``); its webdataset reader itself runs as a CPU pipeline here. Verified
by hand with DALI 2.4.0 on the digits shards (all 1,438 samples identical and in order).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_shard_index import _dataset, _jpeg  # noqa: E402

from largessl.data.manifest import read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return _dataset(tmp_path_factory.mktemp("indexed"))


def test_dali_reads_our_shards_with_our_indexes(data: str) -> None:
    """DALI's webdataset reader on our .tar + .idx files (CPU pipeline) yields our samples, in order.

    Skips, printing why, where DALI is not installed.
    """
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda120)")
    from nvidia.dali import fn, pipeline_def

    m = read_manifest(data)

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(paths=[s.url for s in m.shards], index_paths=[s.index for s in m.shards],
                                           ext=["jpg", "cls"], random_shuffle=False))

    p = pipe()
    p.build()
    got: list[tuple[bytes, int]] = []
    while len(got) < m.num_samples:
        jpg, cls = p.run()
        got += [(jpg.at(i).tobytes(), int(cls.at(i).tobytes())) for i in range(len(jpg))]
    # samples in manifest order: keys 0..n-1 of _dataset, written in order
    assert got[:m.num_samples] == [(_jpeg(i), i % 3) for i in range(m.num_samples)]
