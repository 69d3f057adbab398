"""Weighted k-nearest-neighbour classification on frozen features.

Protocol of Wu et al. (2018), used by VICReg (Appendix D.3, Table 11) and the Shuffled-DBN paper: cosine
similarity to every training feature, the k most similar vote for their class with weight exp(sim / T),
the class with the largest summed weight wins. k = 20 and 200, T = 0.07.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"kNN needs 2-D features of the same width; got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if (train_labels < 0).any():
        raise ValueError("kNN training labels must be >= 0 (unlabelled samples cannot vote)")


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: Sequence[int] = (20, 200), temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 512) -> dict[int, torch.Tensor]:
    """Predicted class of every test feature for each ``k`` (k larger than the train set is clipped)."""
    _check(train_feats, train_labels, test_feats)
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be > 0 (got {temperature})")
    if not k or any(int(x) < 1 for x in k):
        raise ValueError(f"kNN k must be positive integers (got {list(k)})")
    n_train = train_feats.shape[0]
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    ks = {int(x): min(int(x), n_train) for x in k}
    for asked, used in ks.items():
        if used < asked:
            log.warning("kNN: k=%d exceeds the %d training samples; using k=%d", asked, n_train, used)
    k_max = max(ks.values())
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long()
    out: dict[int, list[torch.Tensor]] = {x: [] for x in ks}
    # chunks bound the (chunk, n_train) similarity matrix; ImageNet's train set has 1.28M rows
    for test in F.normalize(test_feats.float(), dim=1).split(chunk_size):
        sims, idx = (test @ train.T).topk(k_max, dim=1)  # sorted, most similar first
        # shifting by the row's best similarity scales all of a row's weights equally (same vote) and
        # keeps exp() finite for small temperatures (exp(1 / 0.01) overflows float32)
        weights = ((sims - sims[:, :1]) / temperature).exp()
        onehot = F.one_hot(labels[idx], num_classes).float()  # (chunk, k_max, C)
        for asked, used in ks.items():
            scores = (onehot[:, :used] * weights[:, :used, None]).sum(dim=1)
            out[asked].append(scores.argmax(dim=1))
    return {x: torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for x, p in out.items()}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: Sequence[int] = (20, 200), temperature: float = 0.07,
                 num_classes: int | None = None) -> dict[int, float]:
    """Top-1 accuracy in percent for each ``k``."""
    if test_feats.shape[0] != test_labels.shape[0] or test_feats.shape[0] == 0:
        raise ValueError(f"need one label per test feature and at least one test sample "
                         f"(got {test_feats.shape[0]} features, {test_labels.shape[0]} labels)")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    preds = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return {x: 100.0 * (p == test_labels.long()).float().mean().item() for x, p in preds.items()}
