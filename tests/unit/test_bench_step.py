"""``largessl bench step`` on CPU with tiny sizes: report structure, ratios from measured numbers, baselines' math.

No assertion is about speed: CPU timings on a shared CI machine say nothing about the GPU goals.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from largessl.bench import step as bench_step
from largessl.cli import main
from largessl.config import load_config
from largessl.methods import build_method
from largessl.models import build_backbone
from largessl.run import exit_codes
from largessl.train.optim import LARS

TINY = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "data.image_size=16",
        "train.device=cpu", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def report() -> dict:
    torch.set_num_threads(1)
    return bench_step.run_step_bench(load_config(None, TINY), per_rank_batch_size=4, steps=2, warmup=1)


def test_report_has_every_variant_with_consistent_rates(report: dict) -> None:
    assert report["bench"] == "step" and report["device"] == "cpu" and report["world_size"] == 1
    assert set(report["variants"]) == {"ours", "reference", "floor"}
    for name, m in report["variants"].items():
        assert m["steps"] == 2 and m["images_per_step"] == 4, name
        assert m["seconds"] > 0
        assert m["ms_per_step"] == pytest.approx(1000 * m["seconds"] / 2)
        assert m["images_per_s"] == pytest.approx(4 * 2 / m["seconds"])
        assert m["peak_memory_mb"] is None  # a CUDA figure; CPU reports host RSS instead
        assert isinstance(m["host_syncs_per_step"], int), name  # the detector counts on the CPU too
    assert report["variants"]["ours"]["host_syncs_per_step"] == 0  # the hot path waits for nothing
    assert report["host_peak_rss_mb"] > 0
    assert report["variants"]["ours"]["precision"] == "fp32"
    assert report["variants"]["reference"]["channels_last"] is False
    assert report["variants"]["floor"]["extra"]["backbone_images_per_step"] == 8  # 2 views x 4 images
    json.dumps(report)  # the --json output


def test_ratios_are_computed_from_the_measured_variants(report: dict) -> None:
    v, r = report["variants"], report["ratios"]
    assert r["speedup_vs_reference"] == pytest.approx(v["ours"]["images_per_s"] / v["reference"]["images_per_s"])
    assert r["step_over_floor"] == pytest.approx(v["ours"]["ms_per_step"] / v["floor"]["ms_per_step"])
    loss = report["loss"]
    assert loss["loss_ms"] > 0 and loss["embedding_dim"] == 32
    assert r["loss_share"] == pytest.approx(loss["loss_ms"] / v["ours"]["ms_per_step"])
    assert report["global_images_per_s"]["ours"] == pytest.approx(v["ours"]["images_per_s"])
    # CPU numbers are never judged against the GPU goals
    assert report["goals"]["evaluated"] is False and "CPU" in report["goals"]["reason"]
    text = bench_step.format_step_report(report)
    assert "speed-up of ours over reference" in text and "goals not judged" in text


def test_compute_ratios_and_goal_judging_on_given_numbers() -> None:
    variants = {"ours": {"images_per_s": 1600.0, "ms_per_step": 160.0},
                "reference": {"images_per_s": 1000.0, "ms_per_step": 256.0},
                "floor": {"images_per_s": 1800.0, "ms_per_step": 142.0}}
    r = bench_step.compute_ratios(variants, loss_ms=8.0)
    assert r == pytest.approx({"speedup_vs_reference": 1.6, "step_over_floor": 160 / 142, "loss_share": 0.05})
    judged = bench_step.judge_goals({"device": "cuda", "ratios": r})
    assert judged == {"evaluated": True, "speedup_vs_reference": True, "step_over_floor": True, "loss_share": True}
    slow = bench_step.judge_goals({"device": "cuda", "ratios": {**r, "step_over_floor": 1.3}})
    assert slow["step_over_floor"] is False
    partial = bench_step.compute_ratios({"ours": variants["ours"]}, None)
    assert partial == {"speedup_vs_reference": None, "step_over_floor": None, "loss_share": None}


def test_time_steps_runs_warmup_then_timed_steps() -> None:
    calls: list[int] = []
    seconds = bench_step.time_steps(calls.append, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and seconds >= 0
    with pytest.raises(ValueError, match="steps >= 1"):
        bench_step.time_steps(calls.append, steps=0, warmup=0, device=torch.device("cpu"))


class _TinyBackbone(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_reference_loss_is_the_anchor_formula() -> None:
    torch.manual_seed(0)
    model = bench_step.ReferenceBarlowTwins(_TinyBackbone(), [8, 5], lambd=0.01, global_batch_size=7)
    y1, y2 = torch.randn(7, 3, 2, 2), torch.randn(7, 3, 2, 2)
    got = model(y1, y2)

    def bn(z: torch.Tensor) -> torch.Tensor:  # per-rank BatchNorm1d in training mode: biased variance, eps 1e-5
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    z1, z2 = model.projector(model.backbone(y1)), model.projector(model.backbone(y2))
    c = bn(z1).T @ bn(z2) / 7
    off = c - torch.diag(torch.diagonal(c))
    expected = ((torch.diagonal(c) - 1) ** 2).sum() + 0.01 * (off ** 2).sum()
    torch.testing.assert_close(got, expected)


def test_reference_lars_makes_the_same_update_as_the_trainers_lars() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    b = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    b.load_state_dict(a.state_dict())
    hp = dict(weight_decay=0.01, momentum=0.9, eta=0.02)

    def groups(m: nn.Module, adapt_key: bool) -> list[dict]:
        w = [p for p in m.parameters() if p.ndim > 1]
        bn = [p for p in m.parameters() if p.ndim == 1]
        extra_w = {"lars_adapt": True} if adapt_key else {}
        extra_b = {"lars_adapt": False, "weight_decay": 0.0} if adapt_key else {}
        return [{"params": w, "lr": 0.5, **extra_w}, {"params": bn, "lr": 0.1, **extra_b}]

    ref = bench_step.ReferenceLARS(groups(a, False), lr=0.5, **hp)
    ours = LARS(groups(b, True), lr=0.5, **hp)
    x = torch.randn(8, 5)
    for _ in range(3):
        for m, opt in ((a, ref), (b, ours)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_loss_timer_computes_the_methods_own_loss(method: str) -> None:
    cfg = load_config(None, [*TINY, f"method.name={method}"])
    torch.manual_seed(0)
    module = build_method(cfg.method, build_backbone(cfg.model))
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    expected = module(views).loss
    z = [module.projector(module.backbone(v)) for v in views]
    torch.testing.assert_close(bench_step.LOSS_TIMERS[method](module, z), expected)


def test_cli_writes_json_for_a_subset_of_variants(tmp_path) -> None:
    out = tmp_path / "step.json"
    rc = main(["bench", "step", *TINY, "--per-rank-batch-size", "2", "--steps", "1", "--warmup", "0",
               "--variants", "floor", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert list(rep["variants"]) == ["floor"] and rep["loss"]["loss_ms"] is None
    assert rep["ratios"] == {"speedup_vs_reference": None, "step_over_floor": None, "loss_share": None}


def test_cli_rejects_bad_input() -> None:
    assert main(["bench", "step", *TINY, "--variants", "ours,fastest"]) == exit_codes.BAD_INPUT
    # a global batch of one cannot standardise embeddings: train.global_batch_size must be >= 2
    assert main(["bench", "step", *TINY, "--per-rank-batch-size", "1", "--variants", "floor"]) == exit_codes.BAD_INPUT
