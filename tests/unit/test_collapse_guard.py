"""The collapse guard's rule on synthetic measurements: thresholds, warm-up, patience, reset, bad values."""

from __future__ import annotations

import math

import pytest

from largessl.config import load_config
from largessl.run import exit_codes
from largessl.run.state import state_for_exit
from largessl.train.collapse_guard import DEFAULT, THRESHOLDS, CollapseGuard, collapsed

HEALTHY = {"collapse/m_o": 0.46, "collapse/rankme": 96.7}  # the demo's Barlow Twins at step 500
POINT = {"collapse/m_o": 0.999, "collapse/rankme": 1.0}  # every input to one point
LINE = {"collapse/m_o": 0.8, "collapse/rankme": 1.7}  # seed 004's collapsing variants at small scale


def test_the_rule() -> None:
    assert collapsed(HEALTHY) == ""
    assert "complete collapse: m_o 0.999 > 0.95" in collapsed(POINT) and "RankMe 1.00 < 2.5" in collapsed(POINT)
    assert collapsed(LINE) == "dimensional collapse: RankMe 1.70 < 2.5"
    assert collapsed({"collapse/m_o": math.nan, "collapse/rankme": math.inf}) == ""  # never on a bad value
    assert collapsed({"loss": 1.0}) == ""  # a log step without collapse metrics
    assert set(THRESHOLDS) == {"barlow_twins", "vicreg", "simsiam", "decorrelation", "multiview"}
    assert all(t == DEFAULT for k, t in THRESHOLDS.items() if k != "vicreg")
    shrunk = {**HEALTHY, "collapse/std": 0.02}  # VICReg without its variance term: spread directions, no scale
    assert collapsed(shrunk) == ""  # scale-free methods do not look at std
    assert collapsed(shrunk, THRESHOLDS["vicreg"]) == "collapse of scale: std 0.0200 < 0.05"


def test_patience_warmup_and_reset() -> None:
    g = CollapseGuard("vicreg", patience=3, warmup_steps=100)
    assert g.observe(50, POINT) == "" and g.observe(100, POINT) == ""  # warm-up: not counted
    assert g.observe(150, POINT) == "" and g.observe(200, POINT) == ""
    assert g.observe(250, HEALTHY) == ""  # one healthy measurement resets the streak
    assert g.observe(300, LINE) == "" and g.observe(350, LINE) == ""
    why = g.observe(400, LINE)
    assert why.startswith("collapsed: dimensional collapse") and "3 consecutive measurements (steps 300-400)" in why
    assert "train.collapse_guard" in why


def test_config_and_exit_code() -> None:
    cfg = load_config(None, [])
    assert cfg.train.collapse_guard is True and cfg.train.collapse_guard_patience == 3
    with pytest.raises(ValueError, match="collapse_guard_patience must be >= 1"):
        load_config(None, ["train.collapse_guard_patience=0"])
    assert exit_codes.COLLAPSED == 5 and exit_codes.COLLAPSED in exit_codes.FAIL_FAST
    assert state_for_exit(exit_codes.COLLAPSED) == "collapsed"
