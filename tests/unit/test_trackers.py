"""Tracker sinks never hold training: a failing tracker is retried from a queue, overflow is dropped and counted,
close is bounded; tracker run ids persist in the run directory; config validation."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from largessl.config import load_config
from largessl.run.trackers import TrackerSink, flatten, numbers, read_ids, write_id


class _Flaky(TrackerSink):
    name = "flaky"

    def __init__(self, fail_first: int, **kw) -> None:
        self.fail_first, self.got, self.calls = fail_first, [], 0
        self.down = threading.Event()
        super().__init__(**kw)

    def _send(self, record):
        self.calls += 1
        if self.down.is_set() or self.calls <= self.fail_first:
            raise ConnectionError("tracker down")
        self.got.append(record["step"])


def test_an_outage_is_retried_in_order_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sink = _Flaky(fail_first=3, backoff_s=0.01)
    t0 = time.monotonic()
    for step in range(1, 51):
        sink.write({"step": step, "loss": 1.0 / step})
    assert time.monotonic() - t0 < 1.0  # writing is a queue append, whatever the tracker does
    sink.close()
    assert sink.got == list(range(1, 51)) and sink.dropped == 0
    text = caplog.text
    assert "flaky: cannot log (ConnectionError: tracker down)" in text and "logging again after an outage" in text
    assert text.count("cannot log") == 1  # warned once per outage, not per record


def test_a_full_queue_drops_the_oldest_and_close_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sink = _Flaky(fail_first=0, max_queue=5, close_timeout_s=0.3, backoff_s=0.01)
    sink.down.set()  # down for good
    for step in range(1, 21):
        sink.write({"step": step, "loss": 0.5})
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 3.0
    assert sink.got == [] and sink.dropped == 20  # 15 pushed out of the queue, 5 left at close
    assert "20 metric record(s) could not be logged and were dropped" in caplog.text


def test_helpers_and_ids(tmp_path) -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1]}) == {"a.b": 1, "a.c.d": "x", "e": [1]}
    assert numbers({"step": 3, "loss": 2, "ok": True, "name": "x", "lr": 0.1}) == {"loss": 2.0, "lr": 0.1}
    assert read_ids(tmp_path) == {}
    write_id(tmp_path, "mlflow", "abc")
    write_id(tmp_path, "wandb", "xyz")
    assert read_ids(tmp_path) == {"mlflow": "abc", "wandb": "xyz"}


def test_config() -> None:
    assert load_config(None, []).log.trackers == ["tensorboard"]
    assert load_config(None, ["log.trackers=[tensorboard,mlflow,wandb]"]).log.trackers == ["tensorboard", "mlflow",
                                                                                              "wandb"]
    with pytest.raises(ValueError, match="log.trackers: unknown"):
        load_config(None, ["log.trackers=[comet]"])
