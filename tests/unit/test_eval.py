"""Evaluation building blocks: weighted kNN, linear probe, online probe, feature extraction and the per-rank cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from largessl.data.batch import Batch
from largessl.eval.features import (
    FeatureShard,
    cache_dir,
    cached_or_extracted,
    extract_features,
    extract_shard,
    load_shard,
    weights_hash,
)
from largessl.eval.knn import knn_accuracy, knn_classify
from largessl.eval.linear import (
    LinearHead,
    cosine_lr,
    sweep_linear_probe,
    topk_correct,
    train_linear_probe,
)
from largessl.nn.batchnorm import GlobalBatchNorm1d
from largessl.train.online_probe import OnlineProbe


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


def _shard(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float16) -> FeatureShard:
    return FeatureShard(x.to(dtype), y, [len(y)], 0)


def test_linear_probe_on_cached_features_learns_and_is_deterministic():
    tx, ty = _blobs(50, 5, 32, 2.0, 0)
    vx, vy = _blobs(20, 5, 32, 2.0, 1)
    kw = dict(num_classes=5, epochs=20, lr=0.5, batch_size=50, weight_decay=0.0)
    a = train_linear_probe(_shard(tx, ty), _shard(vx, vy), **kw)
    b = train_linear_probe(_shard(tx, ty), _shard(vx, vy), **kw)
    assert a["top1"] > 90.0 and a["top5"] == 100.0 and a == b
    noise = train_linear_probe(_shard(torch.randn_like(tx), ty), _shard(torch.randn_like(vx), vy), **kw)
    assert noise["top1"] < 50.0
    normalized = train_linear_probe(_shard(tx, ty), _shard(vx, vy), normalize=True, **kw)
    assert normalized["top1"] > 90.0 and normalized["normalize"] is True
    kw.pop("lr")
    sweep = sweep_linear_probe(_shard(tx, ty), _shard(vx, vy), lrs=[1e-6, 0.5], **kw)
    assert [r["lr"] for r in sweep["sweep"]] == [1e-6, 0.5] and sweep["lr"] == 0.5
    with pytest.raises(ValueError, match="exceeds the 250 training samples"):
        train_linear_probe(_shard(tx, ty), _shard(vx, vy), **{**kw, "batch_size": 256})
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        train_linear_probe(_shard(tx, ty + 3), _shard(vx, vy), **kw)


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
    shard = extract_shard(net, batches, "cpu")  # the stages' path: fp16 rows of this rank, with counts
    assert shard.features.dtype == torch.float16 and shard.counts == [10] and shard.offset == 0
    torch.testing.assert_close(shard.features.float(), feats, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="no samples"):
        extract_features(net, [], "cpu")
    with pytest.raises(ValueError, match="beyond fp16's range"):
        extract_shard(_Huge(), batches, "cpu")


class _Huge(nn.Module):
    num_features = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], 2), 1e6)


def test_per_rank_cache_is_keyed_and_reused(tmp_path):
    torch.manual_seed(0)
    net = _Tiny().eval()
    images, labels = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    calls = []

    def extract():
        calls.append(1)
        return extract_shard(net, [(images, labels)], "cpu")

    key = weights_hash(net)
    assert key == weights_hash(net) and len(key) == 64
    folder = cache_dir(tmp_path, "train", "m" * 64, key, 8, "fp16")
    meta = {"split": "train", "manifest_id": "m" * 64, "weights": key, "image_size": "8", "dtype": "fp16"}
    first = cached_or_extracted(folder, meta, extract, torch.device("cpu"))
    second = cached_or_extracted(folder, meta, extract, torch.device("cpu"))
    assert calls == [1] and torch.equal(first.features, second.features) and second.counts == [12]
    assert sorted(p.name for p in folder.iterdir()) == ["rank-00000-of-00001.safetensors"]
    assert torch.equal(load_shard(folder / "rank-00000-of-00001.safetensors", "cpu").labels, labels)
    # other weights (or image size, dtype, manifest) miss the cache and extract again
    cached_or_extracted(folder, {**meta, "weights": "other"}, extract, torch.device("cpu"))
    assert calls == [1, 1]
    with torch.no_grad():
        net.conv.weight.add_(1.0)
    assert weights_hash(net) != key


def test_linear_head_uses_global_batch_norm():
    head = LinearHead(6, 3, normalize=True)
    assert isinstance(head.norm, GlobalBatchNorm1d) and not head.norm.affine
    assert head(torch.randn(5, 6)).shape == (5, 3)
