"""Linear and kNN evaluation on the digits shards: Barlow Twins pretraining vs a random init, via the CLI.

Pretrains the demo's ResNet-18 (ImageNet stem at 32 px) for a few dozen steps with `largessl pretrain`,
then evaluates it and a random-init backbone of the same architecture with `largessl eval knn|linear`
on the same splits. With this stem a random encoder's pooled features are poor (kNN ≈ 30%), so a short
Barlow Twins run must beat it clearly on both protocols.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from largessl.cli import main
from largessl.data.digits import write_digits_shards
from largessl.demo import DEMO_OVERRIDES

COMMON = [*DEMO_OVERRIDES, "log.progress=false", "log.tensorboard=false", "data.num_workers=0"]
PRETRAIN = ["train.num_steps=40", "checkpoint.every_steps=1000", "checkpoint.at_epoch_end=false"]
EVAL = ["eval.linear_epochs=30", "eval.linear_lr_sweep=[0.3]"]


def _results(out: Path) -> tuple[dict, dict]:
    return (json.loads((out / "eval" / "knn.json").read_text()),
            json.loads((out / "eval" / "linear.json").read_text()))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pretrained_beats_random_init_on_digits(tmp_path):
    train, val = write_digits_shards(str(tmp_path / "digits"), image_size=32)
    run_dir = tmp_path / "run"
    data = ["--train", train, "--val", val]
    assert main(["pretrain", f"train.run_dir={run_dir}", f"data.train_manifest={train}",
                 f"data.val_manifest={val}", *COMMON, *PRETRAIN]) == 0
    for protocol in ("knn", "linear"):
        assert main(["eval", protocol, "--checkpoint", str(run_dir), *data, *COMMON, *EVAL]) == 0
        assert main(["eval", protocol, "--checkpoint", "random", "--out", str(tmp_path / "random"), *data,
                     *COMMON, *EVAL]) == 0
    knn, linear = _results(run_dir)
    knn_rand, linear_rand = _results(tmp_path / "random")
    print(f"pretrained: kNN {knn['top1']}, linear {linear['top1']:.2f}; "
          f"random init: kNN {knn_rand['top1']}, linear {linear_rand['top1']:.2f}")
    assert knn["top1"]["20"] > knn_rand["top1"]["20"] + 8.0
    assert linear["top1"] > linear_rand["top1"] + 1.0
