"""`largessl demo` end to end on the real path (digits shards → pretrain → kNN/linear), shortened for CI, and
its random-init baselines: the encoder exactly as the run starts from it, and torchvision's init."""

from __future__ import annotations

import json

import pytest
import torch

from largessl.data.digits import write_digits_shards
from largessl.demo import demo_config, initial_backbone, run_demo
from largessl.distributed.env import DistEnv
from largessl.eval.source import load_source
from largessl.hub import load_backbone
from largessl.models import build_backbone
from largessl.train.trainer import build_trainer

# Margins measured with this test's settings (the demo's 150 steps, 30 linear epochs instead of 100, 2 threads)
# on the project's 2-core machine, train.seed 0 (the default) and, for the spread, 1 and 2 (README "The demo"):
#   kNN top-1 over the encoder the run starts from: +76.0 / +77.2 / +79.4 points;
#   kNN top-1 over torchvision's init of the same seed: +1.4 / +5.0 / +4.7 points (96.4 vs 95.0 for seed 0).
# The val split has 359 images, so one image is 0.28 points and seed 0's margin is 5 images. The test asks for
# less than the margin: a strict gain over torchvision's init (at least one image), because another CPU's
# round-off moves small-scale accuracies by a point or more (docs/repro.md saw 93.6 vs 86.9 for one row).
# A recipe that stops learning, or one that learns flip invariance (the old "small" augmentation: 93.9%),
# fails it.
KNN_GAIN_OVER_AS_TRAINED = 30.0
"""Points of kNN top-1 over the encoder the run starts from (measured: 76+ points; zero-init residual branches
make that encoder nearly a linear map of the pixels, 20% kNN)."""
KNN_GAIN_OVER_TORCHVISION = 0.0
"""Points of kNN top-1 over torchvision's default init of the same seed: strictly more (measured: +1.4)."""
DEMO_STEPS = 150
"""The demo's own length (``largessl demo --steps`` default), so the test checks the recipe users run."""


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_demo_pretraining_beats_both_random_inits(tmp_path, capsys):
    torch.set_num_threads(2)
    res = run_demo(str(tmp_path / "demo"), steps=DEMO_STEPS, threads=2, linear_epochs=30,
                   overrides=["train.log_every=5", "checkpoint.every_steps=50"])
    rows = res["rows"]
    bt, start, tv = rows["Barlow Twins"], rows["random init (as trained)"], rows["random init (torchvision)"]
    assert bt["knn_top1"] > start["knn_top1"] + KNN_GAIN_OVER_AS_TRAINED, rows
    assert bt["linear_top1"] > start["linear_top1"], rows
    assert bt["knn_top1"] > tv["knn_top1"] + KNN_GAIN_OVER_TORCHVISION, rows
    assert set(rows) == {"random init (as trained)", "random init (torchvision)", "Barlow Twins"}
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "run directory:" in printed and "tensorboard --logdir" in printed
    run = tmp_path / "demo" / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == DEMO_STEPS and (run / "tb").is_dir() and (run / "config.yaml").is_file()
    # the demo publishes its backbone to a local hub; the printed load line works
    hub = tmp_path / "demo" / "hub"
    assert "load_backbone" in printed and (hub / "index.html").is_file()
    net = load_backbone(res["hub_ref"], hub=str(hub))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, net.num_features)


def test_random_init_baseline_is_step_0_of_the_run(tmp_path):
    train_url, val_url = write_digits_shards(str(tmp_path / "data"), image_size=32)
    cfg = demo_config(tmp_path, steps=2, train_url=train_url, val_url=val_url)
    trainer = build_trainer(cfg, DistEnv())  # the run, before its first step
    step0 = trainer.module.backbone.state_dict()
    as_trained = initial_backbone(cfg).state_dict()
    assert list(step0) == list(as_trained)
    assert all(torch.equal(step0[k], as_trained[k]) for k in step0), [k for k in step0
                                                                      if not torch.equal(step0[k], as_trained[k])]
    # `largessl eval --checkpoint random` evaluates the same encoder
    source, _, _ = load_source("random", cfg)
    assert all(torch.equal(v, as_trained[k]) for k, v in source.backbone.state_dict().items())
    # torchvision's init: same seed, so it differs only where zero_init_residual zeroes each block's last BN
    tv = initial_backbone(cfg, zero_init_residual=False).state_dict()
    differing = sorted(k for k in tv if not torch.equal(tv[k], as_trained[k]))
    assert differing == sorted(f"layer{i}.{j}.bn2.weight" for i in range(1, 5) for j in range(2))
    assert all(as_trained[k].eq(0).all() and tv[k].eq(1).all() for k in differing)
    # a different seed (the old demo used seed + 1) is a different encoder
    torch.manual_seed(cfg.train.seed + 1)
    other = build_backbone(cfg.model).state_dict()
    assert not torch.equal(other["conv1.weight"], as_trained["conv1.weight"])
