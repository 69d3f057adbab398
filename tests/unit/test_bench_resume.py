"""`largessl bench resume` on tiny sizes: the report's fields and its decode accounting (never its speed)."""

from __future__ import annotations

import pytest

from largessl.bench.resume import run_bench

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def test_resume_bench_reports_both_times_and_decodes_nothing_consumed(tmp_path) -> None:
    res = run_bench(shards=6, per_shard=24, image_size=32, batch_size=8, workers=1, shuffle_buffer=20, at=0.9,
                    rounds=1, workdir=str(tmp_path), crop=16)
    assert res["shards"] == 6 and res["samples"] == 144 and res["batches_per_epoch"] == 18
    assert res["resume_batch"] == 16 and set(res["first_batch_s"]) == {"start", "resume", "resume_no_index"}
    assert all(v > 0 for v in res["first_batch_s"].values())
    assert res["resume_over_start"] == pytest.approx(res["first_batch_s"]["resume"] / res["first_batch_s"]["start"],
                                                     rel=1e-2)
    assert res["consumed_samples_decoded"] == 0
    assert res["samples_decoded_after_resume"] >= 2 * 8  # the accounting sees the first batches (both variants)
    assert set(res["goal"]) == {"ratio_max", "met"}
    assert not list(tmp_path.iterdir())  # the temporary shards are gone


def test_resume_bench_rejects_a_position_without_batches(tmp_path) -> None:
    with pytest.raises(ValueError, match="--at in"):
        run_bench(shards=2, per_shard=8, at=1.0, workdir=str(tmp_path))
