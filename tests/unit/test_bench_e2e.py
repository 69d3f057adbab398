"""``largessl bench e2e`` on CPU over digits shards: report structure, data-wait and CPU figures, ratios.

No assertion is about speed: a CPU smoke run only shows the harness measures what it says.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from largessl.bench import e2e
from largessl.cli import main
from largessl.config import load_config
from largessl.data.batch import Batch
from largessl.data.digits import write_digits_shards
from largessl.run import exit_codes

TINY = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "data.image_size=16",
        "data.augment=small", "train.device=cpu", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    train, _ = write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=32)
    return train


@pytest.fixture(scope="module")
def report(manifest: str) -> dict:
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY, "data.num_workers=0"])
    return e2e.run_e2e_bench(cfg, manifest, per_rank_batch_size=8, steps=3, warmup=1)


def test_report_structure_and_rates(report: dict, manifest: str) -> None:
    assert report["bench"] == "e2e" and report["device"] == "cpu" and report["manifest"] == manifest
    assert report["view_shapes"] == [[8, 3, 16, 16], [8, 3, 16, 16]]
    assert report["num_samples"] > 1000 and report["loader"]["num_workers"] == 0
    assert report["loader"]["pin_memory"] is False  # pinning is for CUDA copies only
    m = report["e2e"]
    assert m["seconds"] > 0
    assert m["images_per_s"] == pytest.approx(8 * 3 / m["seconds"])
    assert m["ms_per_step"] == pytest.approx(1000 * m["seconds"] / 3)
    # with no workers the main process decodes every batch, so it always waits for data
    assert 0 < m["data_wait_s"] < m["seconds"]
    assert m["data_wait_frac"] == pytest.approx(m["data_wait_s"] / m["seconds"])
    json.dumps(report)


def test_cpu_figures_and_ratio(report: dict) -> None:
    cpu = report["cpu"]
    assert cpu["num_cores"] == os.cpu_count()
    assert 0.0 <= cpu["utilisation"] <= 1.0
    assert cpu["cores_busy"] == pytest.approx(cpu["utilisation"] * cpu["num_cores"])
    step = report["step"]
    assert step["name"] == "ours" and step["images_per_step"] == 8
    assert report["ratios"]["e2e_over_step"] == pytest.approx(report["e2e"]["images_per_s"] / step["images_per_s"])
    assert report["goals"]["evaluated"] is False
    text = e2e.format_e2e_report(report)
    assert "data wait" in text and "end to end / step" in text


def test_proc_stat_parsing() -> None:
    busy, total = e2e.read_proc_stat("cpu  100 5 50 800 40 3 2 0 7 0\n")
    assert total == 1000 and busy == 1000 - 800 - 40
    with pytest.raises(RuntimeError, match="psutil"):
        e2e.read_proc_stat("intr 1 2 3")


@pytest.mark.parametrize("source", ["/proc/stat", "psutil"])
def test_cpu_meter_sees_a_busy_loop(source: str) -> None:
    # psutil is a declared test dependency (the `test` extra): a missing one fails here instead of skipping.
    if source == "/proc/stat" and not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this platform; psutil covers the meter")
    meter = e2e.CpuMeter(source)
    assert meter.source == source
    meter.start()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        sum(range(1000))
    out = meter.stop()
    assert 0.0 < out["utilisation"] <= 1.0 and out["source"] == source
    if source == "psutil":
        assert out["process_tree_cores"] > 0
    else:
        assert out["process_tree_cores"] is None
    with pytest.raises(ValueError, match="source"):
        e2e.CpuMeter("top")


class _TwoBatchStream:
    batches_per_epoch = 2

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def iterate(self, epoch: int, start_batch: int = 0):
        self.epochs.append(epoch)
        for i in range(2):
            yield Batch(views=[torch.zeros(1)], labels=torch.tensor([epoch * 10 + i]))


def test_batches_roll_over_epochs() -> None:
    stream = _TwoBatchStream()
    b = e2e._Batches(stream)
    labels = [int(b.next().labels) for _ in range(5)]
    b.close()
    assert labels == [0, 1, 10, 11, 20] and stream.epochs == [0, 1, 2] and b.epochs_started == 3


def test_cli_with_a_worker_and_no_step(manifest: str, tmp_path) -> None:
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", *TINY, "data.num_workers=1", "--data", manifest, "--per-rank-batch-size", "4",
               "--steps", "2", "--warmup", "1", "--no-step", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["loader"]["num_workers"] == 1 and rep["step"] is None and rep["ratios"]["e2e_over_step"] is None
    assert 0.0 <= rep["e2e"]["data_wait_frac"] <= 1.0


def test_missing_or_bad_manifest_is_reported(tmp_path) -> None:
    with pytest.raises(ValueError, match="--data"):
        e2e.e2e_config(load_config(None, TINY), "", 4, 1, str(tmp_path))
    missing = tmp_path / "nowhere" / "manifest.json"
    rc = main(["bench", "e2e", *TINY, "--data", str(missing), "--per-rank-batch-size", "4", "--steps", "1"])
    assert rc == exit_codes.BAD_INPUT  # a manifest that is not there is bad input: no retry makes it appear
