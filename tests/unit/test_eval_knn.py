"""The kNN's exactness contract in one process: grid features, exact similarities, the tie rule, any tiling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from largessl.eval.knn import (
    SCORE_SCALE,
    KnnShard,
    _similarities,
    chunk_working_set_bytes,
    knn_classify,
    knn_predict,
    local_candidates,
    prepare_features,
)


def _tie_heavy(n: int, q: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features with few distinct values (many exactly equal similarities) and duplicated rows."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (n // 2, dim), generator=g).float()
    train = torch.cat([base, base[torch.randperm(len(base), generator=g)]])  # every row twice
    labels = torch.randint(0, classes, (len(train),), generator=g)
    queries = torch.cat([train[:q // 2], torch.randint(-2, 3, (q - q // 2, dim), generator=g).float()])
    return train, labels, queries


def _reference(train: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float,
               classes: int) -> list[int]:
    """The documented rule in plain Python on exact integers: sort by (similarity desc, index asc), weights
    exp((s - s_max) / T), per-class sums in neighbour order, the lowest class among equal sums."""
    t = (prepare_features(train).double() * 2048).round().long()
    q = (prepare_features(queries).double() * 2048).round().long()
    sims = (q @ t.T).tolist()  # exact integers (= similarity x 2^22)
    out = []
    for row in sims:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        top = row[order[0]]
        scores = [0.0] * classes
        for i in order:
            scores[int(labels[i])] += math.exp((row[i] - top) / (SCORE_SCALE * temperature))
        best = max(scores)
        out.append(scores.index(best))
    return out


def test_grid_features_make_similarities_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g) * torch.rand(300, 1, generator=g) * 10
    x[0] = 0.0  # a zero row stays zero
    p = prepare_features(x)
    assert p.dtype == torch.float16 and torch.equal(p[0], torch.zeros(96, dtype=torch.float16))
    grid = p.double() * 2048
    assert torch.equal(grid, grid.round())  # on the 2^-11 grid, exactly representable
    assert float((p[1:].double().norm(dim=1) - 1).abs().max()) < 0.01
    # row-wise: a row prepared alone equals the same row prepared with others
    assert torch.equal(prepare_features(x[5:6]), p[5:6])
    exact = (grid[:40].long() @ grid.long().T).double() / SCORE_SCALE
    for rows, cols in [(40, 300), (7, 13), (1, 1)]:
        got = _similarities(p[:rows], p[:cols])
        assert got.dtype == torch.float32 and torch.equal(got.double(), exact[:rows, :cols])


def test_tie_rule_by_hand():
    same = torch.tensor([[1.0, 0.0]])
    train = torch.cat([same, same, same, torch.tensor([[0.0, 1.0], [0.6, 0.8]])])
    labels = torch.tensor([2, 1, 0, 0, 0])
    query = same.clone()
    preds = knn_classify(train, labels, query, k=(1, 2, 3), temperature=0.07, num_classes=3)
    assert preds[1].tolist() == [2]  # three equal similarities: the lowest global index (0, class 2) is nearest
    assert preds[2].tolist() == [1]  # indices 0 and 1: classes 2 and 1 tie on weight -> the lower class
    assert preds[3].tolist() == [0]  # indices 0, 1, 2: one vote each -> class 0 (lowest) among three ties
    # the candidate keys put the three equal rows in index order, then the farther rows
    shard = KnnShard(prepare_features(train), labels, 0, 5)
    cand = local_candidates(prepare_features(query), shard, 5, block=2)
    assert cand[0, :, 1].tolist() == [2, 1, 0, 0, 0]


def test_weighted_vote_matches_the_plain_python_rule_ties_included():
    train, labels, queries = _tie_heavy(400, 60, 6, 5, seed=1)
    for k, temperature in [(1, 0.07), (20, 0.07), (200, 0.07), (20, 1e-3), (50, 5.0)]:
        got = knn_classify(train, labels, queries, k=(k,), temperature=temperature, num_classes=5)[k]
        assert got.tolist() == _reference(train, labels, queries, k, temperature, 5), (k, temperature)


def test_predictions_do_not_depend_on_chunk_or_block_size():
    train, labels, queries = _tie_heavy(1000, 80, 8, 7, seed=2)
    ref = knn_classify(train, labels, queries, k=(20, 200), num_classes=7)
    for chunk, block in [(1, 1000), (7, 13), (80, 1), (64, 333)]:
        got = knn_classify(train, labels, queries, k=(20, 200), num_classes=7, chunk_size=chunk, block=block)
        assert all(torch.equal(got[k], ref[k]) for k in (20, 200)), (chunk, block)


def test_quantised_knn_agrees_with_fp32_cosine_knn():
    """The 2^-11 grid changes ~no prediction on overlapping classes (the old fp32 implementation as reference)."""
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(10, 128, generator=g)
    y, yq = torch.randint(0, 10, (4000,), generator=g), torch.randint(0, 10, (500,), generator=g)
    x = centers[y] + 3.0 * torch.randn(4000, 128, generator=g)
    q = centers[yq] + 3.0 * torch.randn(500, 128, generator=g)
    got = knn_classify(x, y, q, k=(20,), num_classes=10)[20]
    sims, idx = (F.normalize(q) @ F.normalize(x).T).topk(20, dim=1)
    w = ((sims - sims[:, :1]) / 0.07).exp()
    ref = (F.one_hot(y[idx], 10).float() * w[..., None]).sum(1).argmax(1)
    assert 0.3 < float((ref == yq).float().mean()) < 0.99  # a task where neighbours matter
    assert float((got == ref).float().mean()) >= 0.99


def test_knn_predict_checks_its_inputs():
    shard = KnnShard(prepare_features(torch.randn(10, 4)), torch.arange(10) % 2, 0, 10)
    with pytest.raises(ValueError, match="fp16 rows"):
        knn_predict(torch.randn(3, 4), shard)
    with pytest.raises(ValueError, match="labels must be in"):
        knn_predict(prepare_features(torch.randn(3, 4)), shard, num_classes=1)
    part = KnnShard(shard.features[:5], shard.labels[:5], 5, 10)
    with pytest.raises(ValueError, match="sharded=True"):
        knn_predict(prepare_features(torch.randn(3, 4)), part, num_classes=2)
    with pytest.raises(ValueError, match="fp16"):
        KnnShard(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), 0, 3)


def test_working_set_bound_does_not_grow_with_the_data():
    small = chunk_working_set_bytes(2048, 512, 32768, 200, 8, 1000)
    assert small == chunk_working_set_bytes(2048, 512, 32768, 200, 8, 1000)
    # ImageNet: a 1.28M x 2048 fp16 train set is 5.2 GB; one chunk's working set is a fraction of it
    assert small < 1.28e6 * 2048 * 2 / 8
