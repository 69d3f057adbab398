"""Evaluation building blocks: weighted kNN, linear probe, online probe, feature extraction and cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from largessl.data.batch import Batch
from largessl.eval.features import extract_features, load_feature_cache, save_feature_cache
from largessl.eval.knn import knn_accuracy, knn_classify
from largessl.eval.linear import (
    LinearHead,
    cosine_lr,
    sweep_linear_probe,
    topk_correct,
    train_linear_full,
    train_linear_probe,
)
from largessl.eval.online_probe import OnlineProbe


def _blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_weighted_vote_by_hand():
    # train points on the unit circle; the test point sits between class 0 (two far) and class 1 (one near)
    ang = torch.tensor([0.0, 0.1, 1.0])
    train = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[math.cos(0.02), math.sin(0.02)]])
    # k=1: nearest is class 1. k=3 with low T: the near class-1 point dominates exp(sim/T).
    preds = knn_classify(train, labels, test, k=(1, 3), temperature=0.01)
    assert preds[1].tolist() == [1]
    sims = (train @ test[0]).double()
    w = (sims / 0.01).exp()  # float64: no overflow in the reference
    assert w[0] > w[1] + w[2]
    assert preds[3].tolist() == [1]
    # with a very high T the votes are ~equal and the majority (class 0) wins
    assert knn_classify(train, labels, test, k=(3,), temperature=100.0)[3].item() == 0


def test_knn_accuracy_separable_and_k_clipped():
    tx, ty = _blobs(20, 4, 16, 0.5, 0)
    vx, vy = _blobs(10, 4, 16, 0.5, 1)
    acc = knn_accuracy(tx, ty, vx, vy, k=(20, 200), temperature=0.07)
    assert set(acc) == {20, 200}
    assert acc[20] == 100.0 and acc[200] > 90.0  # k=200 is clipped to the 80 train points
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(tx, shuffled, vx, vy, k=(20,))[20] < 60.0


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="same width"):
        knn_classify(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5))
    with pytest.raises(ValueError, match=">= 0"):
        knn_classify(torch.randn(4, 3), torch.tensor([0, 1, -1, 0]), torch.randn(2, 3))


def test_topk_and_cosine():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, (1, 5)).tolist() == [1.0, 3.0]  # top-5 clipped to 3 classes
    assert cosine_lr(1.0, 0.0) == 1.0 and cosine_lr(1.0, 1.0) == pytest.approx(0.0)
    assert cosine_lr(1.0, 0.5) == pytest.approx(0.5)


def test_linear_probe_on_cached_features_learns_and_is_deterministic():
    tx, ty = _blobs(50, 5, 32, 2.0, 0)
    vx, vy = _blobs(20, 5, 32, 2.0, 1)
    kw = dict(num_classes=5, epochs=20, lr=0.5, batch_size=50, weight_decay=0.0)
    a = train_linear_probe(tx, ty, vx, vy, **kw)
    b = train_linear_probe(tx, ty, vx, vy, **kw)
    assert a["top1"] > 90.0 and a["top5"] == 100.0 and a == b
    noise = train_linear_probe(torch.randn_like(tx), ty, torch.randn_like(vx), vy, **kw)
    assert noise["top1"] < 50.0
    kw.pop("lr")
    sweep = sweep_linear_probe(tx, ty, vx, vy, lrs=[1e-6, 0.5], **kw)
    assert [r["lr"] for r in sweep["sweep"]] == [1e-6, 0.5] and sweep["lr"] == 0.5


def test_online_probe_trains_without_touching_the_backbone():
    torch.manual_seed(0)
    backbone = nn.Linear(8, 16)
    probe = OnlineProbe(16, 3, lr=0.5)
    x, y = _blobs(30, 3, 8, 0.3, 0)
    before = backbone.weight.detach().clone()
    first = None
    for _ in range(30):
        feats = backbone(x)  # requires grad: the probe must detach
        out = probe.step(feats, y)
        first = first or out["online_probe_loss"].item()
        assert not out["online_probe_loss"].requires_grad
    assert backbone.weight.grad is None and torch.equal(backbone.weight, before)
    assert out["online_probe_loss"].item() < first / 2 and out["online_probe_top1"].item() > 90.0
    # unlabelled samples (-1) are ignored
    probe.step(backbone(x), torch.full_like(y, -1))
    state = probe.full_state_dict()
    other = OnlineProbe(16, 3, lr=0.5)
    other.load_full_state_dict(state)
    torch.testing.assert_close(other(backbone(x)), probe(backbone(x)))


class _Tiny(nn.Module):
    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean((2, 3))


def test_extract_features_batches_and_cache(tmp_path):
    torch.manual_seed(0)
    net = _Tiny().train()
    images = torch.randn(10, 3, 8, 8)
    labels = torch.arange(10) % 3
    batches = [Batch(views=[images[i:i + 4]], labels=labels[i:i + 4]) for i in range(0, 10, 4)]
    feats, ys = extract_features(net, batches, "cpu")
    assert net.training  # mode restored
    net.eval()
    torch.testing.assert_close(feats, net(images))  # eval mode: BN running stats, not batch stats
    assert ys.tolist() == labels.tolist()
    pairs = [(images[i:i + 5], labels[i:i + 5]) for i in (0, 5)]  # a plain DataLoader's (x, y) works too
    torch.testing.assert_close(extract_features(net, pairs, "cpu")[0], feats)
    save_feature_cache(tmp_path / "c.safetensors", feats, ys)
    f2, y2 = load_feature_cache(tmp_path / "c.safetensors")
    assert torch.equal(f2, feats) and torch.equal(y2, ys)
    with pytest.raises(ValueError, match="no samples"):
        extract_features(net, [], "cpu")


def test_full_protocol_resumes_after_each_epoch(tmp_path):
    torch.manual_seed(0)
    net = _Tiny()
    x, y = torch.randn(64, 3, 8, 8), torch.arange(64) % 2
    x[y == 1] += 1.0
    train = lambda epoch: [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    val = lambda: [(x, y)]  # noqa: E731
    kw = dict(num_classes=2, num_train_samples=64, batch_size=16, lr=0.5, weight_decay=0.0)
    full = train_linear_full(net, train, val, out_dir=tmp_path / "a", epochs=4, **kw)
    state = torch.load(tmp_path / "a" / "linear_state.pt", weights_only=True)
    assert state["epoch"] == 4 and full["top1"] > 90.0

    # a run killed after epoch 2: its state file holds epoch 2; rerunning continues to the same result
    calls = []

    def killed_after_two(epoch):
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return train(epoch)

    with pytest.raises(KeyboardInterrupt):
        train_linear_full(net, killed_after_two, val, out_dir=tmp_path / "b", epochs=4, **kw)
    assert torch.load(tmp_path / "b" / "linear_state.pt", weights_only=True)["epoch"] == 2
    calls.clear()
    resumed = train_linear_full(net, lambda e: calls.append(e) or train(e), val, out_dir=tmp_path / "b",
                                epochs=4, **kw)
    assert calls == [2, 3]  # only the remaining epochs ran
    assert resumed["top1"] == full["top1"] and resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="different settings"):
        train_linear_full(net, train, val, out_dir=tmp_path / "b", epochs=5, **kw)


def test_linear_head_normalize_option():
    head = LinearHead(6, 3, normalize=True)
    assert isinstance(head.norm, nn.BatchNorm1d) and not head.norm.affine
    assert head(torch.randn(5, 6)).shape == (5, 3)
