"""Evaluation across real gloo processes: uneven feature gathers and W ranks × B/W ≡ 1 rank × B for the probe."""

from __future__ import annotations

import torch
from dist_harness import run_distributed
from torch import nn

from largessl.eval.features import extract_features
from largessl.eval.linear import train_linear_full
from largessl.eval.online_probe import OnlineProbe


class _Net(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.arange(n) % 3
    x += y[:, None, None, None].float()  # learnable signal
    return x, y


def _rank_slice(n: int, rank: int, world: int) -> slice:
    return slice(rank * n // world, (rank + 1) * n // world)


def _gather_worker(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data(11)  # 11 samples over 3 ranks: 3, 4, 4 rows
    s = _rank_slice(11, rank, world)
    batches = [(x[s][i:i + 2], y[s][i:i + 2]) for i in range(0, len(y[s]), 2)]
    return extract_features(_Net(), batches, "cpu")


def test_extract_features_gathers_uneven_ranks_in_order():
    results = run_distributed(_gather_worker, 3)
    x, y = _data(11)
    expected = _Net().eval()(x).detach()
    for feats, labels in results:
        torch.testing.assert_close(feats, expected)
        assert labels.tolist() == y.tolist()


def _linear_worker(rank: int, world: int, out_dir: str, global_batch: int) -> dict:
    x, y = _data()
    per_rank = global_batch // world

    def train(epoch: int):
        # every step's global batch is the same set of samples whatever the world size
        for start in range(0, len(y), global_batch):
            idx = slice(start + rank * per_rank, start + (rank + 1) * per_rank)
            yield x[idx], y[idx]

    def val():
        s = _rank_slice(len(y), rank, world)
        return [(x[s], y[s])]

    res = train_linear_full(_Net(), train, val, num_classes=3, num_train_samples=len(y), out_dir=out_dir,
                            epochs=3, lr=0.5, batch_size=global_batch, weight_decay=1e-4, seed=0)
    state = torch.load(f"{out_dir}/linear_state.pt", weights_only=True) if rank == 0 else None
    return {"result": res, "head": state["head"] if state else None}


def test_linear_probe_two_ranks_equal_one_rank(tmp_path):
    two = run_distributed(_linear_worker, 2, str(tmp_path / "two"), 16)
    one = run_distributed(_linear_worker, 1, str(tmp_path / "one"), 16)
    for k, v in one[0]["head"].items():
        torch.testing.assert_close(two[0]["head"][k], v, rtol=1e-5, atol=1e-6)
    assert two[0]["result"]["top1"] == two[1]["result"]["top1"] == one[0]["result"]["top1"]
    assert two[0]["result"]["num_val"] == 48


def _probe_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    probe = OnlineProbe(4, 2, lr=0.1)
    g = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(8, 4, generator=g), torch.tensor([0, 1] * 4)
    s = _rank_slice(8, rank, world)
    for _ in range(3):
        probe.step(feats[s], labels[s])
    return {k: v.clone() for k, v in probe.head.state_dict().items()}


def test_online_probe_stays_identical_across_ranks_and_matches_one_rank():
    two = run_distributed(_probe_worker, 2)
    one = run_distributed(_probe_worker, 1)
    for k in one[0]:
        torch.testing.assert_close(two[0][k], two[1][k], rtol=0, atol=0)
        torch.testing.assert_close(two[0][k], one[0][k], rtol=1e-5, atol=1e-6)
