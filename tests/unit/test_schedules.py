"""Learning-rate schedules: warm-up, cosine floor, constant groups, purity in the step."""

from __future__ import annotations

import pytest
import torch

from largessl.train.schedules import apply_lr, group_lr, warmup_cosine


def test_warmup_is_linear_and_reaches_peak():
    vals = [warmup_cosine(s, 4, 20, 0.001) for s in range(4)]
    assert vals == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_ends_at_floor_and_is_monotone():
    vals = [warmup_cosine(s, 5, 50, 0.01) for s in range(50)]
    assert vals[4] == pytest.approx(1.0)
    assert vals[5] == pytest.approx(1.0)
    assert vals[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(vals[5:], vals[6:]))
    assert warmup_cosine(500, 5, 50, 0.01) == pytest.approx(0.01)  # past the end: stays at the floor


def test_no_warmup_and_negative_step():
    assert warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        warmup_cosine(-1, 0, 10, 0.0)


def test_groups_follow_their_schedule_and_are_pure_in_step():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([
        {"params": [p], "peak_lr": 0.4, "schedule": "cosine"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "peak_lr": 0.05, "schedule": "constant"},
    ], lr=0.0)
    first = apply_lr(opt, 30, 10, 100, 0.001)
    assert first == pytest.approx(0.4 * warmup_cosine(30, 10, 100, 0.001))
    assert opt.param_groups[1]["lr"] == 0.05
    # the same step gives the same lr whatever happened before (resume-safe)
    apply_lr(opt, 99, 10, 100, 0.001)
    assert apply_lr(opt, 30, 10, 100, 0.001) == first
    assert group_lr({"peak_lr": 1.0, "schedule": "constant"}, 0, 10, 100, 0.0) == 1.0
