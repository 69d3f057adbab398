"""Progress on rank 0: a tqdm bar on a terminal, plain log lines with step, loss, images/s and ETA elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from largessl.config import load_config
from largessl.run.progress import ProgressBar, format_duration


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_with_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="largessl.progress")
    bar = ProgressBar(100, 20, True, desc="pretrain", interval_s=30, stream=io.StringIO(), clock=clock)
    assert bar.plain and bar.bar is None
    for _ in range(10):  # 10 steps in 20 s: no line yet
        clock.t += 2
        bar.update(1, loss="1.5", img_s="64")
    assert not caplog.records
    clock.t += 10
    bar.update(1, loss="1.25", img_s="70")  # 11 steps (resumed at 20) in 30 s → 69 left at 30/11 s each
    assert [r.getMessage() for r in caplog.records] == ["pretrain: step 31/100 (31%) loss 1.25 img_s 70 eta 3m08s"]
    clock.t += 5
    bar.update(1)
    assert len(caplog.records) == 1  # the next line waits for the interval
    bar.close()
    assert caplog.records[-1].getMessage().startswith("pretrain: step 32/100 (32%) loss 1.25")
    bar.close()  # closing twice writes nothing more
    assert len(caplog.records) == 2


def test_a_terminal_gets_the_tqdm_bar(caplog: pytest.LogCaptureFixture) -> None:
    tty = _Tty()
    caplog.set_level(logging.INFO, logger="largessl.progress")
    bar = ProgressBar(10, 0, True, desc="kNN", stream=tty)
    assert bar.bar is not None and not bar.plain
    bar.update(3, loss="2")
    bar.close()
    assert "kNN" in tty.getvalue() and "3/10" in tty.getvalue() and not caplog.records


def test_disabled_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="largessl.progress")
    stream = io.StringIO()
    bar = ProgressBar(10, 0, False, stream=stream)
    bar.update(5)
    bar.close()
    assert not caplog.records and stream.getvalue() == ""


def test_durations_and_config() -> None:
    assert [format_duration(s) for s in (7, 125, 3725, 210000)] == ["7s", "2m05s", "1h02m", "2d10h"]
    assert load_config(overrides=["log.progress_every_s=5"]).log.progress_every_s == 5.0
    with pytest.raises(ValueError, match="log.progress_every_s must be > 0"):
        load_config(overrides=["log.progress_every_s=0"])
