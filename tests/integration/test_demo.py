"""`largessl demo` end to end on the real path (digits shards → pretrain → kNN/linear), shortened for CI."""

from __future__ import annotations

import json

import torch

from largessl.demo import run_demo
from largessl.hub import load_backbone


def test_demo_pretraining_beats_random_init(tmp_path, capsys):
    torch.set_num_threads(2)
    res = run_demo(str(tmp_path / "demo"), steps=60, threads=2, linear_epochs=30,
                   overrides=["train.log_every=5", "checkpoint.every_steps=30"])
    rows = res["rows"]
    assert rows["Barlow Twins"]["knn_top1"] > rows["random init (as trained)"]["knn_top1"] + 8.0, rows
    assert rows["Barlow Twins"]["linear_top1"] > rows["random init (as trained)"]["linear_top1"], rows
    assert set(rows) == {"random init (as trained)", "random init (torchvision)", "Barlow Twins"}
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "run directory:" in printed and "tensorboard --logdir" in printed
    run = tmp_path / "demo" / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and (run / "tb").is_dir() and (run / "config.yaml").is_file()
    # the demo publishes its backbone to a local hub; the printed load line works
    hub = tmp_path / "demo" / "hub"
    assert "load_backbone" in printed and (hub / "index.html").is_file()
    net = load_backbone(res["hub_ref"], hub=str(hub))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, net.num_features)
