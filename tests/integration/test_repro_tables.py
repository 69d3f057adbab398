"""Every repro table, shortened and on one seed (``--seeds 1``), through the real trainer on the digits shards
(``--data digits``);
asserts the collapse verdicts that are robust at this length on every seed measured (vanilla collapses and
DBN does not; Naive Siamese collapses and SimSiam does not) and that each table writes its JSON and PNG.
Effect claims (orderings, accuracy at chance) need an interval over several seeds and are never judged on one
(they print "unresolved"). The full-length,
3-seed tables are in docs/repro.md."""

from __future__ import annotations

import json
import math

import pytest
import torch

from largessl.cli import main
from largessl.repro.runner import run_table
from largessl.repro.tables import TABLES, THRESHOLDS, get_table, siam_collapsed

SHORT_STEPS = {"000-table1": 40, "000-table2": 10, "000-fig4": 10, "000-fig2": 100, "004-table2": 200,
               "004-table5": 10}
"""Steps per variant in this test (the defaults are in largessl/repro/tables.py)."""
SEEDS = 1
DATA = "digits"
"""The lengths above and the collapse margins asserted below were measured on sklearn's digits (``--data digits``);
the default photodigits tables (3 seeds, full length) are in docs/repro.md."""
"""One seed keeps the CI cost of the single-seed tests this replaced; the asserted verdicts held on train.seed 0-3."""
BACKBONE = "convnet"
"""The 3-conv network at 16 px (about 5x faster than the default ResNet-18 at 32 px): the collapse verdicts asserted
here show at its scale; the accuracy claims need the default backbone (docs/repro.md)."""


pytestmark = pytest.mark.slow  # 200 s on 2 cores (2026-12-04): CI runs it (make test-slow), make test does not


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("repro")


def _check_written(result: dict, name: str) -> dict[str, dict]:
    saved = json.loads(open(result["json"]).read())
    assert saved["name"] == name and len(saved["rows"]) == len(get_table(name).variants)
    assert open(result["png"], "rb").read(4) == b"\x89PNG"
    rows = {r["key"]: r for r in saved["rows"]}
    for r in rows.values():
        assert r["steps_done"] == SHORT_STEPS[name], "a generous time budget must not stop the short run"
        assert all(math.isfinite(v) for v in r["metrics"].values()) and len(r["seeds"]) == SEEDS
        assert r["curves"]["loss"] and isinstance(r["verdict"]["reproduced"], bool) and r["verdict"]["evidence"]
        assert r["verdict"]["state"] in ("reproduced", "unresolved", "NOT reproduced")
    assert saved["backbone"] == BACKBONE and saved["image_size"] == 16
    assert len(saved["random_init_knn"]) == SEEDS and 10 < saved["random_init_knn"][0] <= 100  # the floor, measured
    return rows


def test_000_table1_vanilla_collapses_and_dbn_does_not(out_dir):
    result = run_table(get_table("000-table1"), out_dir, minutes=30, num_steps=SHORT_STEPS["000-table1"],
                       seeds=SEEDS, dataset=DATA,
                       backbone=BACKBONE)
    rows = _check_written(result, "000-table1")
    vanilla, bn, dbn = rows["vanilla"]["metrics"], rows["bn"]["metrics"], rows["dbn"]["metrics"]
    assert rows["vanilla"]["verdict"]["reproduced"], rows["vanilla"]["verdict"]
    assert vanilla["std"] < THRESHOLDS["std_collapsed"] and dbn["std"] > THRESHOLDS["std_healthy"], (vanilla, dbn)
    assert bn["std"] > THRESHOLDS["std_healthy"] and bn["corr"] > THRESHOLDS["corr_high"]
    assert dbn["corr"] < THRESHOLDS["corr_low"] < bn["corr"], (dbn["corr"], bn["corr"])
    assert rows["dbn"]["verdict"]["state"] == "unresolved"  # its kNN ordering is not judged on one seed


def test_004_table2_naive_collapses_and_simsiam_does_not(out_dir):
    result = run_table(get_table("004-table2"), out_dir, minutes=30, num_steps=SHORT_STEPS["004-table2"],
                       seeds=SEEDS, dataset=DATA,
                       backbone=BACKBONE)
    rows = _check_written(result, "004-table2")
    naive, simsiam = rows["naive"]["metrics"], rows["simsiam"]["metrics"]
    assert not siam_collapsed(simsiam), simsiam
    # its collapse check holds; its accuracy above the collapsing rows needs an interval, so on one seed: unresolved
    v = rows["simsiam"]["verdict"]
    assert v["state"] == "unresolved" and "not collapsed" in v["evidence"] and "[ok]" in v["evidence"], v
    assert "kNN SimSiam − Naive ≥ 3 points" in v["evidence"] and "one seed, no interval" in v["evidence"], v
    # Naive Siamese collapses dimensionally, its centre growing. Measured over train.seed 0-3 with the
    # 3-layer projector: held-out RankMe 6-14 of 256 at 100 steps (seed 3 not yet below 12.8), 3.5-4.9 at
    # 200 (m_o 0.78-0.83, corr >= 0.99); SimSiam (seeds 0-1) 52-55, m_o <= 0.2. 200 steps (the full table runs 300)
    # leaves a margin for other CPUs' round-off (on CI, 100 steps with a 2-layer projector stayed at corr 0.85).
    assert siam_collapsed(naive), naive
    # the paper's accuracy collapse (chance) needs an interval: on one seed the row is unresolved, never reproduced
    assert rows["naive"]["verdict"]["state"] == "unresolved" and "one seed, no interval" in rows["naive"]["verdict"][
        "evidence"], rows["naive"]["verdict"]
    assert naive["m_o"] > simsiam["m_o"] and naive["corr"] > simsiam["corr"], (naive, simsiam)


@pytest.mark.parametrize("name", [n for n in TABLES if n not in ("000-table1", "004-table2")])
def test_other_tables_run_short_and_write_results(out_dir, name):
    result = run_table(get_table(name), out_dir, minutes=30, num_steps=SHORT_STEPS[name], seeds=SEEDS, dataset=DATA,
                       backbone=BACKBONE)
    rows = _check_written(result, name)
    if name == "000-fig2":  # the 2-D space: held-out points for the scatter, vanilla collapsed to a point
        # (held-out std over train.seed 0-3: 0.040-0.055 after 40 steps, 0.023-0.032 after 80, 0.013 after 200)
        assert all(len(r["points"]) == len(r["labels"]) > 100 for r in rows.values())
        assert rows["vanilla"]["metrics"]["std"] < 0.05


def test_cli_prints_the_table_and_reuses_finished_variants(out_dir, capsys):
    # 000-fig4 already ran above with these settings in this directory: the CLI reuses both variants
    assert main(["repro", "000-fig4", "--steps", str(SHORT_STEPS["000-fig4"]), "--seeds", str(SEEDS),
                 "--data", DATA, "--backbone", BACKBONE, "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "000-fig4" in text and "Shuffled-DBN" in text and "paper corr" in text and "verdict" in text
    assert "seeds: 1" in text and "one seed, no interval" in text and "backbone: convnet" in text
    assert "random init (torchvision's" in text and "3-conv backbone at 16 px" in text
    assert "results:" in text and "plot:" in text
