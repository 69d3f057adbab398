"""tools/chaos.py's verdict on synthetic ledgers: what it must accept and every kind of loss it must catch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location("chaos", Path(__file__).resolve().parents[2] / "tools" / "chaos.py")
assert _spec is not None and _spec.loader is not None
chaos = importlib.util.module_from_spec(_spec)
sys.modules["chaos"] = chaos
_spec.loader.exec_module(chaos)

PER_EPOCH = 4
BATCH = 4


def key(step: int, rank: int, world: int, i: int) -> str:
    """A sample key unique within an epoch (the same samples come back, in another order, next epoch)."""
    per_rank = BATCH // world
    return f"k{((step - 1) % PER_EPOCH) * BATCH + rank * per_rank + i}"


def start(inc: int, world: int, steps: range, saved: tuple[int, ...] = (), code: int = 75,
          keys: Any = key) -> list[dict[str, Any]]:
    """The ledger records of one job start."""
    out = [{"e": "start", "inc": inc, "rank": r, "world": world} for r in range(world)]
    for step in steps:
        for r in range(world):
            out.append({"e": "batch", "inc": inc, "rank": r, "step": step, "epoch": (step - 1) // PER_EPOCH,
                        "keys": [keys(step, r, world, i) for i in range(BATCH // world)],
                        "stats": {"worker": 0, "skipped_samples": 0, "skipped_shards": 0}})
        if step in saved:
            out.append({"e": "saved", "inc": inc, "rank": 0, "step": step})
    out += [{"e": "exit", "inc": inc, "rank": r, "code": code} for r in range(world)]
    return out


def check(records: list[dict[str, Any]], num_steps: int = 10, reference: dict | None = None) -> list[str]:
    return chaos.check_run(records, num_steps, BATCH, PER_EPOCH, reference)[0]


def test_a_history_with_restarts_and_world_changes_loses_nothing() -> None:
    # killed after step 7 (saved at 5), resumed at 5 on 4 ranks, stopped at 8, resumed on 2 to the end
    records = start(0, 2, range(1, 8), saved=(5,), code=-9) + start(1, 4, range(6, 9), saved=(8,)) \
        + start(2, 2, range(9, 11), saved=(10,), code=0)
    assert check(records) == []
    assert chaos.world_legs(records) == [(2, 1), (4, 6), (2, 9)]
    _, per_step = chaos.check_run(records, 10, BATCH, PER_EPOCH)
    assert sorted(per_step) == list(range(1, 11))


def test_steps_trained_and_lost_before_a_resume_do_not_count() -> None:
    # steps 6-7 of the killed start trained other samples: they were rolled back, so they do not matter
    odd = start(0, 2, range(1, 8), saved=(5,), code=-9, keys=lambda s, r, w, i: f"x{s}-{r}-{i}" if s > 5
                else key(s, r, w, i))
    assert check(odd + start(1, 2, range(6, 11), code=0)) == []


def test_a_sample_seen_twice_in_an_epoch_is_caught() -> None:
    twice = start(0, 2, range(1, 11), code=0, keys=lambda s, r, w, i: "k0" if (s, r, i) == (2, 1, 0)
                  else key(s, r, w, i))
    (problem,) = check(twice)
    assert "sample k0 trained twice in epoch 0 (steps 1 and 2)" in problem


def test_a_short_batch_and_a_skipped_sample_are_caught() -> None:
    records = start(0, 2, range(1, 11), code=0)
    batch = next(r for r in records if r["e"] == "batch" and r["step"] == 3 and r["rank"] == 1)
    batch["keys"] = batch["keys"][:-1]
    batch["stats"]["skipped_samples"] = 1
    problems = check(records)
    assert any("step 3: 3 samples, the global batch is 4" in p for p in problems)
    assert any("step 3 rank 1: {'skipped_samples': 1}" in p for p in problems)


def test_a_resume_from_a_step_no_earlier_start_trained_is_caught() -> None:
    problems = check(start(0, 2, range(1, 6), saved=(5,), code=-9) + start(1, 2, range(8, 11), code=0))
    assert any("start 1 resumed at step 7, which no earlier start trained" in p for p in problems)
    assert any("missing [1, 2, 3, 4, 5, 6, 7]" in p for p in problems)


def test_a_run_that_stops_short_or_differs_from_the_reference_is_caught() -> None:
    assert any("the run has 12" in p for p in check(start(0, 2, range(1, 11), code=0), num_steps=12))
    records = start(0, 2, range(1, 11), code=0)
    _, reference = chaos.check_run(records, 10, BATCH, PER_EPOCH)
    assert check(records, reference=reference) == []
    reference[4] = sorted(["k0", "k1", "k2", "k99"])
    assert check(records, reference=reference) == ["step 4: its batch differs from the undisturbed run's"]


def test_lineage_follows_the_start_that_saved_the_resumed_checkpoint() -> None:
    # start 1 redid steps 6-8 on 4 ranks without saving 8; start 2 resumed at 8 from start 0's checkpoint
    records = start(0, 2, range(1, 9), saved=(5, 8), code=75) + start(1, 4, range(9, 10), code=-9)
    records += start(2, 2, range(9, 11), code=0)
    chain = chaos.lineage(chaos.incarnations(records), [])
    assert [(i.inc, a, b) for i, a, b in chain] == [(0, 1, 8), (2, 9, 10)]


def test_the_schedule_is_seeded_and_draws_every_kind_each_round() -> None:
    a, b = chaos.draw_schedule(20, 3, chaos.KINDS), chaos.draw_schedule(20, 3, chaos.KINDS)
    assert a == b and a != chaos.draw_schedule(20, 4, chaos.KINDS)
    assert sorted(f.kind for f in a[:8]) == sorted(chaos.KINDS) == sorted(f.kind for f in a[8:16])
    assert all(3 <= f.gap <= 9 for f in a)
    assert chaos.run_length(a) == sum(f.gap for f in a) + 3 * 20 + 25


@pytest.mark.parametrize(("codes", "log", "reason"), [
    ([3, 3], "10:00:02 [rank 1] ERROR largessl: [pair.cc:561] Connection closed by peer\n"
             "10:00:01 [rank 0] ERROR largessl: storage error (EndpointConnectionError): Could not connect to "
             "the endpoint URL: \"http://h/b/ckpt/step-00000015/COMPLETE.json\"", "storage error saving step 15"),
    ([3, 3], "10:00:01 [rank 0] ERROR largessl: disk full (no space left on device); free space", "disk full"),
    ([-9, 3], "10:00:01 [rank 1] ERROR largessl: Timed out waiting 15000ms for recv", "collective timeout"),
    ([75, 75], "10:00:01 [rank 0] INFO stopped: SIGTERM", "stop agreed, saved"),
])
def test_exit_reasons_name_the_first_error(codes: list[int], log: str, reason: str) -> None:
    assert chaos.exit_reason(log, codes) == reason
