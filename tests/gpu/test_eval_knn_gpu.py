"""The kNN's exactness on CUDA: IEEE fp32 similarities (TF32 off) equal the CPU and the exact integers, ties included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from largessl.eval.knn import (
    SCORE_SCALE,
    KnnShard,
    _similarities,
    ieee_fp32,
    knn_classify,
    knn_predict,
    prepare_features,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU tier runs only on a GPU machine (make gpu-test)")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


def test_cuda_similarities_are_exact_even_when_tf32_is_allowed():
    g = torch.Generator().manual_seed(0)
    p = prepare_features(torch.randn(512, 2048, generator=g))
    exact = ((p.double() * 2048).round().long() @ (p.double() * 2048).round().long().T).double() / SCORE_SCALE
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # a user's global setting must not break exactness
    try:
        with ieee_fp32():
            got = _similarities(p.cuda(), p.cuda())
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.equal(got.double().cpu(), exact)


def test_cuda_knn_equals_cpu_knn_ties_included():
    from test_eval_distributed import KNN_CLASSES, _knn_data

    train, labels, queries, _ = _knn_data()
    cpu = knn_classify(train, labels, queries, k=(20, 200), num_classes=KNN_CLASSES)
    gpu = knn_classify(train.cuda(), labels.cuda(), queries.cuda(), k=(20, 200), num_classes=KNN_CLASSES)
    for k in (20, 200):
        assert torch.equal(gpu[k].cpu(), cpu[k])


def _two_ranks_on_one_gpu(rank: int, world: int) -> list[int]:
    from test_eval_distributed import KNN_CLASSES, KNN_N, KNN_Q, _knn_data

    train, labels, queries, _ = _knn_data()
    lo, hi = rank * KNN_N // world, (rank + 1) * KNN_N // world
    qlo, qhi = rank * KNN_Q // world, (rank + 1) * KNN_Q // world
    shard = KnnShard(prepare_features(train[lo:hi]).cuda(), labels[lo:hi].cuda(), lo, KNN_N)
    preds = knn_predict(prepare_features(queries[qlo:qhi]).cuda(), shard, (200,), 0.07, KNN_CLASSES, 128, 4096,
                        sharded=True)
    return preds[200].cpu().tolist()


def test_sharded_cuda_knn_equals_one_process():
    from dist_harness import run_distributed
    from test_eval_distributed import KNN_CLASSES, _knn_data

    train, labels, queries, _ = _knn_data()
    ref = knn_classify(train, labels, queries, k=(200,), num_classes=KNN_CLASSES)[200].tolist()
    parts = run_distributed(_two_ranks_on_one_gpu, 2)  # gloo carries the CUDA tensors between the two ranks
    assert [p for r in parts for p in r] == ref
