"""A known effect removed turns a repro row NOT reproduced: seed 000 Table 1's BN row claims no complete collapse
(std ≈ 1) with dimensional collapse; with the standardisation removed (the same run without its BN head) the
projections collapse, and the row's verdict must say NOT reproduced. The unablated row, same seed and length, is
reproduced, so the check can fail either way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from largessl.repro.runner import IMAGE_SIZE, prepare_data, run_variant
from largessl.repro.tables import NOT_REPRODUCED, REPRODUCED, get_table

STEPS = 40
"""Vanilla (no head) is at std < 0.05 after 40 steps in the 1-seed table test (tests/integration/test_repro_tables.py)."""

pytestmark = pytest.mark.timeout(600)


def test_bn_row_turns_not_reproduced_when_standardisation_is_removed(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    table = get_table("000-table1")
    bn = next(v for v in table.variants if v.key == "bn")
    ablated = dataclasses.replace(bn, key="bn_no_standardisation", overrides=("method.head=none",))
    train, val = prepare_data(tmp_path, image_size=IMAGE_SIZE)  # the fast 3-conv scale: the check is about collapse
    real = run_variant(table, bn, tmp_path, train, val, STEPS, 30.0, backbone="convnet").metrics
    gone = run_variant(table, ablated, tmp_path, train, val, STEPS, 30.0, backbone="convnet").metrics
    print(f"std {real['std']:.3f} -> {gone['std']:.3f}, corr {real['corr']:.2f} -> {gone['corr']:.2f}")

    def bn_verdict(metrics: dict[str, float]):
        # the BN row's checks read only the BN runs; the other rows' inputs do not enter its verdict
        return table.verdict({"vanilla": [metrics], "bn": [metrics], "dbn": [metrics]})["bn"]

    kept = bn_verdict(real)
    assert kept.state == REPRODUCED, kept.explain()
    removed = bn_verdict(gone)
    assert removed.state == NOT_REPRODUCED, removed.explain()
    assert "std" in removed.explain() and "FAILS" in removed.explain()
