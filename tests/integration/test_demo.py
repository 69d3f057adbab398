"""`largessl demo` end to end on the real path (photodigits shards → pretrain → kNN/linear) at the demo's own
length, and its random-init baselines: the encoder exactly as the run starts from it, and torchvision's init."""

from __future__ import annotations

import json

import pytest
import torch

from largessl.data.digits import write_digits_shards
from largessl.demo import DEFAULT_STEPS, demo_config, initial_backbone, run_demo
from largessl.distributed.env import DistEnv
from largessl.eval.source import load_source
from largessl.hub import load_backbone
from largessl.models import build_backbone
from largessl.train.trainer import build_trainer

# Margins over torchvision's init of the same seed, measured with the demo's defaults (photodigits, 400 steps,
# data.min_scale 0.8, 100 linear epochs, 2 threads) on the project's 2-core machine, train.seed 0 / 1 / 2 (README
# "The demo"):
MEASURED_KNN_GAIN = (10.6, 12.8, 15.0)  # kNN 71.3 / 71.0 / 75.2 vs 60.7 / 58.2 / 60.2
MEASURED_LINEAR_GAIN = (16.7, 18.1, 17.0)  # linear 78.3 / 77.2 / 76.9 vs 61.6 / 59.1 / 59.9
# The test runs seed 0 and asks for the smallest measured gain minus two standard deviations of the gains over the
# seeds (another CPU's round-off moves a small-scale accuracy by about a seed's spread); the kNN gains' sd (2.2)
# stands for both, as three linear gains happen to agree more closely (sd 0.7) than round-off can be trusted to. A
# recipe that stops learning, or learns an invariance the task needs (a flip: a mirrored digit is another glyph),
# falls below it.
KNN_GAIN_OVER_TORCHVISION = 6.2  # 10.6 - 2 x 2.2 (sd of the kNN gains)
LINEAR_GAIN_OVER_TORCHVISION = 12.3  # 16.7 - 2 x 2.2
KNN_GAIN_OVER_AS_TRAINED = 20.0
"""Points of kNN top-1 over the encoder the run starts from (zero-init residual branches make it nearly a linear map
of the pixels)."""


@pytest.mark.slow  # minutes on 2 cores: CI runs it (make test-slow), make test does not
def test_demo_pretraining_beats_both_random_inits(tmp_path, capsys):
    torch.set_num_threads(2)
    res = run_demo(str(tmp_path / "demo"), threads=2)  # the demo exactly as `make demo` runs it
    rows = res["rows"]
    bt, start, tv = rows["Barlow Twins"], rows["random init (as trained)"], rows["random init (torchvision)"]
    print(rows)
    assert res["data"] == "photodigits" and res["steps"] == DEFAULT_STEPS["photodigits"]
    assert bt["knn_top1"] > start["knn_top1"] + KNN_GAIN_OVER_AS_TRAINED, rows
    assert bt["knn_top1"] > tv["knn_top1"] + KNN_GAIN_OVER_TORCHVISION, rows
    assert bt["linear_top1"] > tv["linear_top1"] + LINEAR_GAIN_OVER_TORCHVISION, rows
    assert set(rows) == {"random init (as trained)", "random init (torchvision)", "Barlow Twins"}
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "run directory:" in printed and "tensorboard --logdir" in printed
    assert "data: photodigits" in printed and "linear gain over torchvision's init" in printed
    run = tmp_path / "demo" / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == DEFAULT_STEPS["photodigits"] and (run / "tb").is_dir() and (run / "config.yaml").is_file()
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
