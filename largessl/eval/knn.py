"""Weighted k-nearest-neighbour classification on frozen features, sharded over ranks, exact and tie-defined.

Protocol of Wu et al. (2018), used by VICReg (Appendix D.3, Table 11) and the Shuffled-DBN paper: cosine
similarity to every training feature, the k most similar vote for their class with weight exp(sim / T),
the class with the largest summed weight wins. k = 20 and 200, T = 0.07.

Scale: each rank keeps only its shard of the train features (fp16, on its device). Queries are scored in
chunks: every rank scores the chunk against its own shard in tiles of ``chunk × block`` similarities and
keeps its k best; an all-gather of those k candidates per query and a top-k over them give the global k
nearest. Per rank the memory is its shard plus one chunk's working set (:func:`chunk_working_set_bytes`).

Exactness and the tie rule. The result is the same on any number of ranks, chunk or block size, bit for bit:

1. :func:`prepare_features` unit-normalises each row (float64) and rounds it to the fixed-point grid
   2^-11, stored exactly in fp16. A dot product of two such rows is a multiple of 2^-22 whose partial sums
   are bounded by the norms (< 2), so it needs at most 24 significant bits: an IEEE fp32 matrix product
   computes it exactly, in any summation order and tiling (TF32 is switched off for it on CUDA).
2. Neighbours are ranked by (similarity descending, global train index ascending): similarity and index
   are packed into one int64 key, so the order is total and ``topk`` has no ties to break. The global train
   index is the row's position in the rank-ordered concatenation of the shards (manifest order).
3. Weights exp((s - s_max) / T) are a product of per-bit factors of the integer similarity gap, multiplied
   in a fixed order (IEEE products round the same in vector and scalar code, unlike ``exp``); votes are
   added neighbour by neighbour in rank order, and ``argmax`` picks the lowest class index among equal sums.

The price of 1 is a similarity quantisation error of about 2e-4 (std, independent of the feature width),
far below the gaps that decide a neighbour's weight at T = 0.07.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import (
    all_gather_counts,
    all_gather_no_grad,
    broadcast_tensor,
    get_rank,
    get_world_size,
)

log = logging.getLogger(__name__)

GRID_BITS = 11
"""Features are rounded to multiples of 2^-GRID_BITS (exact in fp16 for |x| <= 1)."""
SCORE_SCALE = 2 ** (2 * GRID_BITS)
"""Similarities are multiples of 1 / SCORE_SCALE: integers after multiplying by it."""
INDEX_BITS = 38
"""Low bits of a key hold the inverted global train index (up to 2^38 ≈ 2.7e11 train samples)."""
_INDEX_MASK = (1 << INDEX_BITS) - 1
_SENTINEL = torch.iinfo(torch.int64).min
"""Key of a padding candidate (a shard with fewer than k rows): ranks below every real key."""
_WEIGHT_BITS = 26
"""Bits of the integer similarity gap (< 2^25: similarities lie in (-2, 2)) used by the weight product."""


def prepare_features(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows (in float64) and round them to the 2^-11 grid, returned as fp16 (exact).

    Row-wise: the same row gives the same result wherever and with whatever other rows it is prepared.
    Zero rows stay zero.
    """
    if x.ndim != 2:
        raise ValueError(f"kNN features must be 2-D (rows, dim); got shape {tuple(x.shape)}")
    x64 = x.to(torch.float64)
    norm = torch.linalg.vector_norm(x64, dim=1, keepdim=True).clamp_min(1e-12)
    grid = float(2**GRID_BITS)
    return torch.round(x64 / norm * grid).div_(grid).to(torch.float16)


@dataclass
class KnnShard:
    """This rank's prepared train rows: global rows ``offset .. offset + len - 1`` of ``total``."""

    features: torch.Tensor
    """(n, D) fp16 rows from :func:`prepare_features`, on the scoring device."""
    labels: torch.Tensor
    """(n,) int64 class indices, same device."""
    offset: int
    total: int

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.dtype != torch.float16:
            raise ValueError("KnnShard.features must be (n, D) fp16 rows from prepare_features()")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(f"{self.features.shape[0]} train features but {tuple(self.labels.shape)} labels")
        if self.total < 1:
            raise ValueError("kNN needs at least one training feature")
        if not 0 <= self.offset <= self.total - self.features.shape[0]:
            raise AssertionError(f"shard rows {self.offset}+{self.features.shape[0]} outside {self.total}")
        if self.total > _INDEX_MASK:
            raise ValueError(f"kNN supports up to {_INDEX_MASK} training samples (got {self.total})")

    @property
    def nbytes(self) -> int:
        """Bytes held by the shard (features and labels)."""
        return self.features.numel() * self.features.element_size() + self.labels.numel() * 8


def _similarities(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact fp32 dot products of grid rows (see the module docstring, point 1; call under :func:`ieee_fp32`)."""
    return q.float() @ t.float().T


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """IEEE fp32 matrix products on CUDA for the duration (TF32 off), restoring the previous setting."""
    if not torch.cuda.is_available():
        yield
        return
    m = torch.backends.cuda.matmul
    try:
        previous, name = m.allow_tf32, "allow_tf32"
        m.allow_tf32 = False
    except RuntimeError:  # the process set TF32 through the newer fp32_precision API: use that one, not both
        previous, name = m.fp32_precision, "fp32_precision"
        m.fp32_precision = "ieee"
    try:
        yield
    finally:
        setattr(m, name, previous)


def _keys(sims: torch.Tensor, first_index: int) -> torch.Tensor:
    """int64 keys ordering (similarity desc, global index asc); ``sims`` is consumed."""
    keys = sims.mul_(SCORE_SCALE).to(torch.int64)  # exact: sims are multiples of 1 / SCORE_SCALE
    del sims
    idx = torch.arange(first_index, first_index + keys.shape[1], dtype=torch.int64, device=keys.device)
    return keys.mul_(1 << INDEX_BITS).add_(_INDEX_MASK - idx)


def _key_scores(keys: torch.Tensor) -> torch.Tensor:
    """Integer similarity (× SCORE_SCALE) of each key (floor division: the low bits are non-negative)."""
    return torch.bitwise_right_shift(keys, INDEX_BITS)


def _key_indices(keys: torch.Tensor) -> torch.Tensor:
    """Global train index of each (non-sentinel) key."""
    return _INDEX_MASK - torch.bitwise_and(keys, _INDEX_MASK)


def local_candidates(queries: torch.Tensor, train: KnnShard, k: int, block: int) -> torch.Tensor:
    """(C, k, 2) int64 ``[key, label]`` of this shard's k best rows per query, best first, sentinel-padded.

    Scores ``block`` train rows at a time, keeping a running top-k: the live memory is one C × block tile.
    """
    c = queries.shape[0]
    n = train.features.shape[0]
    best: torch.Tensor | None = None
    with ieee_fp32():
        for start in range(0, n, block):
            keys = _keys(_similarities(queries, train.features[start:start + block]), train.offset + start)
            top = keys.topk(min(k, keys.shape[1]), dim=1).values
            del keys
            if best is not None:
                merged = torch.cat([best, top], dim=1)
                top = merged.topk(min(k, merged.shape[1]), dim=1).values
            best = top
    out = torch.full((c, k, 2), _SENTINEL, dtype=torch.int64, device=queries.device)
    out[..., 1] = -1
    if best is not None:
        out[:, : best.shape[1], 0] = best
        out[:, : best.shape[1], 1] = train.labels[_key_indices(best) - train.offset]
    return out


def merge_candidates(candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k best of (C, M, 2) ``[key, label]`` candidates per query, best first."""
    top = candidates[..., 0].topk(k, dim=1)
    return torch.stack([top.values, candidates[..., 1].gather(1, top.indices)], dim=-1)


def _weights(gap: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(-gap / (SCORE_SCALE · T)) in float64 for integer gaps >= 0, bit-reproducible on any layout."""
    w = torch.ones(gap.shape, dtype=torch.float64, device=gap.device)
    for b in range(_WEIGHT_BITS):
        factor = math.exp(-(2.0**b) / (SCORE_SCALE * temperature))
        bit = torch.bitwise_and(torch.bitwise_right_shift(gap, b), 1).bool()
        w = torch.where(bit, w * factor, w)
    return w


def vote(candidates: torch.Tensor, ks: dict[int, int], temperature: float, num_classes: int) -> dict[int, torch.Tensor]:
    """Weighted vote of merged candidates (C, >= max(ks.values()), 2) for each asked k → predicted class (C,)."""
    c = candidates.shape[0]
    used = sorted(set(ks.values()))
    scores_int = _key_scores(candidates[:, : used[-1], 0])
    labels = candidates[:, : used[-1], 1]
    # shifting by the row's best similarity scales a row's weights equally (same vote) and keeps them finite
    w = _weights(scores_int[:, :1] - scores_int, temperature)
    scores = torch.zeros((c, num_classes), dtype=torch.float64, device=candidates.device)
    rows = torch.arange(c, device=candidates.device)
    at: dict[int, torch.Tensor] = {}
    for j in range(used[-1]):
        # one neighbour per row per step: no two adds hit the same cell, the order is the neighbour rank
        scores[rows, labels[:, j]] += w[:, j]
        if j + 1 in used:
            at[j + 1] = scores.argmax(dim=1)  # first (lowest) class among equal sums
    return {asked: at[u] for asked, u in ks.items()}


def _resolve_k(k: Sequence[int], total: int) -> dict[int, int]:
    if not k or any(int(x) < 1 for x in k):
        raise ValueError(f"kNN k must be positive integers (got {list(k)})")
    ks = {int(x): min(int(x), total) for x in k}
    for asked, used in ks.items():
        if used < asked:
            log.warning("kNN: k=%d exceeds the %d training samples; using k=%d", asked, total, used)
    return ks


def chunk_working_set_bytes(dim: int, chunk: int, block: int, k: int, world: int, num_classes: int) -> int:
    """Upper bound of the bytes :func:`knn_predict` allocates beyond the rank's own shard at any time.

    Query chunk (fp16 + an fp32 copy on CPU), one similarity tile (fp32 scores while they turn into int64
    keys, and the fp32 copy of the train block on CPU), the candidates (local, gathered from every rank,
    merged and the top-k temporaries) and the vote (weights, gaps, class sums). Independent of the number of
    train and query rows: the kNN's memory is O(own shard + one chunk).
    """
    query = chunk * dim * (2 + 4)
    tile = chunk * block * (4 + 8) + block * dim * 4 + chunk * k * 8 * 4
    candidates = chunk * k * 16 * (world + 4)
    votes = chunk * k * 8 * 5 + chunk * num_classes * 8 * 2
    return query + tile + candidates + votes


def _predict_local(queries: torch.Tensor, train: KnnShard, ks: dict[int, int], temperature: float,
                   num_classes: int, chunk_size: int, block: int, progress: object | None) -> dict[int, torch.Tensor]:
    k_eff = max(ks.values())
    out: dict[int, list[torch.Tensor]] = {x: [] for x in ks}
    for start in range(0, queries.shape[0], chunk_size):
        cand = local_candidates(queries[start:start + chunk_size], train, k_eff, block)
        for asked, pred in vote(cand, ks, temperature, num_classes).items():
            out[asked].append(pred)
        if progress is not None:
            progress.update(1)
    empty = torch.zeros(0, dtype=torch.long, device=queries.device)
    return {x: torch.cat(p) if p else empty for x, p in out.items()}


def knn_predict(queries: torch.Tensor, train: KnnShard, k: Sequence[int] = (20, 200), temperature: float = 0.07,
                num_classes: int | None = None, chunk_size: int = 512, block: int = 32768,
                group: ProcessGroup | None = None, sharded: bool = False,
                progress: object | None = None) -> dict[int, torch.Tensor]:
    """Predicted class of each of this rank's prepared ``queries`` for each k.

    ``sharded=True`` (a collective over ``group``; every rank must pass it): ``train`` is this rank's shard;
    for each rank in turn, its queries are broadcast chunk by chunk, every rank scores them against its
    shard, and the k candidates per query are all-gathered and merged. ``sharded=False``: ``train`` holds
    every row (one process, or features gathered because they are small) and this rank scores its own
    queries alone. ``progress`` (``update(n)``) advances once per chunk.
    """
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be > 0 (got {temperature})")
    if queries.ndim != 2 or queries.dtype != torch.float16 or queries.shape[1] != train.features.shape[1]:
        raise ValueError(f"kNN queries must be fp16 rows from prepare_features() of width "
                         f"{train.features.shape[1]}; got {queries.dtype} {tuple(queries.shape)}")
    if chunk_size < 1 or block < 1:
        raise ValueError("kNN chunk_size and block must be >= 1")
    ks = _resolve_k(k, train.total)
    if num_classes is None:
        if sharded:
            raise ValueError("pass num_classes when the train features are sharded")
        num_classes = int(train.labels.max()) + 1
    if train.labels.numel() and (int(train.labels.min()) < 0 or int(train.labels.max()) >= num_classes):
        raise ValueError(f"kNN training labels must be in [0, {num_classes}) (unlabelled samples cannot vote)")
    world = get_world_size(group)
    if not sharded or world == 1:
        if train.features.shape[0] != train.total:
            raise ValueError(f"this train shard holds {train.features.shape[0]} of {train.total} rows: pass "
                             "sharded=True on every rank, or gather the features first")
        return _predict_local(queries, train, ks, temperature, num_classes, chunk_size, block, progress)
    rank = get_rank(group)
    device = queries.device
    k_eff = max(ks.values())
    counts = all_gather_counts(queries.shape[0], device, group)
    out: dict[int, list[torch.Tensor]] = {x: [] for x in ks}
    for owner in range(world):
        for start in range(0, counts[owner], chunk_size):
            rows = min(chunk_size, counts[owner] - start)
            if rank == owner:
                q = queries[start:start + rows].contiguous()
            else:
                q = torch.empty((rows, queries.shape[1]), dtype=torch.float16, device=device)
            broadcast_tensor(q, owner, group)
            gathered = all_gather_no_grad(local_candidates(q, train, k_eff, block), group)
            del q
            if rank == owner:
                # (world·rows, k, 2) in rank order → (rows, world·k, 2): each query's candidates side by side
                per_query = gathered.view(world, rows, k_eff, 2).transpose(0, 1).reshape(rows, world * k_eff, 2)
                for asked, pred in vote(merge_candidates(per_query, k_eff), ks, temperature, num_classes).items():
                    out[asked].append(pred)
            del gathered
            if progress is not None:
                progress.update(1)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return {x: torch.cat(p) if p else empty for x, p in out.items()}


def knn_rounds(query_counts: Sequence[int], chunk_size: int, sharded: bool, rank: int) -> int:
    """Number of ``progress.update`` calls :func:`knn_predict` makes on ``rank`` (for progress bars)."""
    if sharded:
        return sum(-(-n // chunk_size) for n in query_counts)
    return -(-query_counts[rank] // chunk_size)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: Sequence[int] = (20, 200), temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 512, block: int = 32768) -> dict[int, torch.Tensor]:
    """Single-process kNN: predicted class of every test feature for each ``k`` (clipped to the train size)."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"kNN needs 2-D features of the same width; got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if (train_labels < 0).any():
        raise ValueError("kNN training labels must be >= 0 (unlabelled samples cannot vote)")
    shard = KnnShard(prepare_features(train_feats), train_labels.long(), 0, train_feats.shape[0])
    return knn_predict(prepare_features(test_feats), shard, k, temperature, num_classes, chunk_size, block)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: Sequence[int] = (20, 200), temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[int, float]:
    """Top-1 accuracy in percent for each ``k`` (single process)."""
    if test_feats.shape[0] != test_labels.shape[0] or test_feats.shape[0] == 0:
        raise ValueError(f"need one label per test feature and at least one test sample "
                         f"(got {test_feats.shape[0]} features, {test_labels.shape[0]} labels)")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    preds = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return {x: 100.0 * (p == test_labels.long()).float().mean().item() for x, p in preds.items()}
