"""Host-device syncs: the detector catches every kind it names; a training step of every method (default online
probe on) and the ``data.decode=gpu`` stage make none outside log and save steps, counted on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from synthetic_stream import SyntheticStream

from largessl.bench.step import count_step_host_syncs
from largessl.config import load_config
from largessl.distributed.env import DistEnv
from largessl.methods import METHODS
from largessl.nn.host_sync import HostSyncCounter, host_side, sync_kind
from largessl.nn.whitening import DBN
from largessl.train.online_probe import OnlineProbe
from largessl.train.trainer import Trainer

aten = torch.ops.aten

BASE = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "train.global_batch_size=8",
        "train.device=cpu", "log.progress=false", "data.num_workers=0", "optim.warmup_epochs=1",
        "train.num_steps=10"]


@pytest.mark.parametrize(("kind", "fn"), [
    ("item", lambda x: x.sum().item()),
    ("item", lambda x: bool(x.sum() > 0)),
    ("item", lambda x: int(x[0])),
    ("item", lambda x: torch.is_nonzero(x[:1])),  # eager is_nonzero reaches the dispatcher as item
    ("equal", lambda x: torch.equal(x, x)),
    ("nonzero", lambda x: x.nonzero()),
    ("nonzero", lambda x: torch.argwhere(x)),
    ("masked_select", lambda x: x.masked_select(x > 1)),
    ("boolean_mask_index", lambda x: x[x > 1]),
    ("boolean_mask_index", lambda x: x.clone().index_put_((x > 1,), torch.tensor(0.0))),
    ("unique", lambda x: torch.unique(x)),
    ("unique", lambda x: torch.unique_consecutive(x)),
    ("repeat_interleave", lambda x: x.repeat_interleave(torch.tensor([1, 2, 0, 1]))),
    ("linalg_eigh", lambda x: torch.linalg.eigh(torch.eye(3))),
    ("linalg_error_check", lambda x: torch.linalg.cholesky(torch.eye(3))),
])
def test_the_detector_catches_each_kind(kind, fn):
    x = torch.arange(4.0)
    with HostSyncCounter("cpu") as c:
        fn(x)
    assert c.counts[kind] >= 1, dict(c.counts)
    with HostSyncCounter("cpu") as c, host_side():
        fn(x)
    assert c.total == 0  # deliberate host work is not a device sync


def test_what_does_not_block_is_not_counted():
    x = torch.arange(4.0)
    with HostSyncCounter("cpu") as c:
        x[torch.tensor([0, 2])]  # integer index: no data-dependent size
        x.repeat_interleave(torch.tensor([1, 2, 0, 1]), output_size=4)
        torch.where(x > 1, x, 0.0).sum()
        torch.nonzero_static(x, size=4)
    assert c.total == 0, dict(c.counts)
    # a CUDA run counts only calls on CUDA tensors: a host tensor's .item() is free there
    with HostSyncCounter("cuda") as c:
        x.sum().item()
    assert c.total == 0
    assert sync_kind(aten._to_copy.default, (x,), {"device": torch.device("cuda")}) == "pageable_host_to_device_copy"


def _trainer(tmp_path: Path, method: str, *extra: str) -> Trainer:
    torch.set_num_threads(1)
    views = ["method.num_views=2"] if method == "multiview" else []
    cfg = load_config(None, [*BASE, f"method.name={method}", *views, f"train.run_dir={tmp_path}", *extra])
    return Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32)


@pytest.mark.parametrize("method", [*METHODS.names(), "decorrelation-newton_schulz"])
def test_a_training_step_of_every_method_makes_no_host_sync(tmp_path, method):
    extra = ["method.whitening=newton_schulz"] if method.endswith("newton_schulz") else []
    name = method.split("-")[0]
    trainer = _trainer(tmp_path, name, *extra)
    assert trainer.probe is not None  # the default online probe takes part
    batches = iter(list(trainer.stream.iterate(0)))  # the synthetic stream's own host work is not counted
    per_step = count_step_host_syncs(trainer, batches, steps=2, warmup=1, count_data=False)
    if method == "decorrelation":
        # eigh reads cuSOLVER's status on the host: one unavoidable sync per DBN call (one per view);
        # docs/benchmarks.md names it and its cost; whitening=newton_schulz has none
        assert per_step == [{"linalg_eigh": 2}] * 2, per_step
    else:
        assert per_step == [{}, {}], per_step


def test_the_gpu_decode_stage_and_step_make_no_host_sync(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_batched import _cfg, write_shards

    from largessl.data.manifest import read_manifest
    from largessl.data.stream import build_train_stream

    torch.set_num_threads(1)
    bad = {3: b"not an image"}  # a substituted row takes the host-side bookkeeping path too
    url = write_shards(tmp_path / "shards", [10, 10], bad)
    stream = build_train_stream(_cfg("gpu", 0), read_manifest(url), 4, 0, 1, seed=3)
    cfg = load_config(None, ["model.arch=repro_convnet", "method.projector=32-32", "train.global_batch_size=4",
                             "train.device=cpu", "log.progress=false", "data.num_workers=0", "data.decode=gpu",
                             "data.image_size=32", "optim.warmup_epochs=1", f"train.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, DistEnv(), stream, stream.batches_per_epoch * 4)
    assert trainer.probe is not None
    per_step = count_step_host_syncs(trainer, iter(stream.iterate(0)), steps=2, warmup=1, count_data=True)
    assert per_step == [{}, {}], per_step


def test_the_masked_online_probe_equals_the_loss_on_the_labelled_rows():
    torch.manual_seed(0)
    probe = OnlineProbe(6, 3, lr=0.1)
    feats, labels = torch.randn(8, 6), torch.tensor([0, 1, -1, 2, -1, 1, 0, 2])
    logits = probe(feats).detach()
    keep = labels >= 0
    want_loss = F.cross_entropy(logits[keep], labels[keep])
    want_top1 = (logits[keep].argmax(1) == labels[keep]).float().mean() * 100
    before = probe.head.weight.detach().clone()
    out = probe.step(feats, labels)
    torch.testing.assert_close(out["online_probe_loss"], want_loss)
    torch.testing.assert_close(out["online_probe_top1"], want_top1)
    assert not torch.equal(before, probe.head.weight)
    # no labelled row: loss and top-1 are 0 and the head does not move (momentum buffers are still zero)
    fresh = OnlineProbe(6, 3, lr=0.1)
    w = fresh.head.weight.detach().clone()
    out = fresh.step(feats, torch.full((8,), -1))
    assert out["online_probe_loss"].item() == 0.0 and out["online_probe_top1"].item() == 0.0
    assert torch.equal(w, fresh.head.weight)


def test_dbn_group_size_attribute_follows_the_state_dict():
    trained = DBN(8, group_size=0)
    trained(torch.randn(10, 8))  # resolves G = 5 at the first batch
    assert trained._g == int(trained.group_size) == 5
    fresh = DBN(8, group_size=0)
    assert fresh._g == 0
    fresh.load_state_dict(trained.state_dict())
    assert fresh._g == 5
    fresh.eval()
    with HostSyncCounter("cpu") as c:
        fresh(torch.randn(4, 8))
    assert c.counts.get("item", 0) == 0, dict(c.counts)
