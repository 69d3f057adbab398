"""DeepSpeed ZeRO-1/2 state resumes on another world size through DeepSpeed's universal checkpoint.

Real gloo ranks: train, save (the trainer's save_engine), load on a different number of ranks (the trainer's
partitions_to_read + load_engine); the whole state -- fp32 weights, every optimizer state key, batch-norm
buffers -- assembled across ranks is bitwise the saved one, for SGD, LARS and AdamW, growing and shrinking.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from torch import nn
from zero_state import assemble, rank_pieces

from largessl.train.config import OptimConfig
from largessl.train.optim import build_optimizer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")


def _net() -> nn.Module:
    torch.manual_seed(0)
    # 6*8 + 8*3 = 72 weight entries and 27 bias/norm entries: on 2 or 3 ranks layers straddle partitions
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _engine(rank: int, world: int, stage: int, optim: str):
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ["LOCAL_RANK"] = str(rank)
    from largessl.run.precision import resolve_precision
    from largessl.train.config import TrainConfig
    from largessl.train.deepspeed_engine import build_engine

    model = _net()
    opt = build_optimizer(model, OptimConfig(name=optim, weight_decay=1e-2), lr=0.1, bias_norm_lr=0.05)
    device = torch.device("cpu")
    return build_engine(model, opt, stage, 4, world, 0.0, resolve_precision(TrainConfig(device="cpu"), device), device)


def _train(engine, rank: int, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()


def _save(rank: int, world: int, stage: int, optim: str, folder: str):
    from largessl.train.deepspeed_engine import save_engine

    engine = _engine(rank, world, stage, optim)
    _train(engine, rank, range(3))
    private = Path(folder) / f"rank{rank}"  # like CheckpointManager: each rank writes into its own folder
    save_engine(engine, private)
    return rank_pieces(engine)


def _load(rank: int, world: int, stage: int, optim: str, saved: str, saved_world: int):
    from largessl.train.deepspeed_engine import load_engine, partitions_to_read

    engine = _engine(rank, world, stage, optim)
    local = Path(saved).parent / f"load-w{world}-r{rank}"
    files = sorted(p.relative_to(saved).as_posix() for p in Path(saved).rglob("*") if p.is_file())
    shared = [f for f in files if "optim_states" not in f]
    for rel in shared:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(saved) / rel, local / rel)
    wanted = partitions_to_read(engine, local, files)
    for rel in wanted:
        shutil.copy(Path(saved) / rel, local / rel)
    load_engine(engine, local, saved_world)
    pieces = rank_pieces(engine)
    _train(engine, rank, range(3, 4))  # it trains on
    # the partitions it needed: those holding a piece of a parameter it now owns (read here from every file)
    zero = engine.optimizer
    owned = [{zero.param_names[p] for p in g if p._hp_mapping is not None} for g in zero.bit16_groups]
    needed = []
    for rel in files:
        if "optim_states" in rel:
            slices = torch.load(Path(saved) / rel, weights_only=False)["optimizer_state_dict"]["param_slice_mappings"]
            if any(owned[i] & set(m) for i, m in enumerate(slices)):
                needed.append(rel)
    return pieces, wanted, needed


def _merge(folder: Path, world: int) -> Path:
    out = folder / "merged"
    for r in range(world):
        shutil.copytree(folder / f"rank{r}", out, dirs_exist_ok=True)
    return out


SLOW = pytest.mark.slow  # 12-23 s each on 2 cores, up to 46 s shared: CI runs them (make test-slow)


@pytest.mark.parametrize("stage,optim,worlds,layout", [
    (2, "lars", (2, 1), True),  # 14 s on 2 cores (up to 43 s while other jobs share them): in make test
    pytest.param(1, "sgd", (2, 3), True, marks=SLOW),
    pytest.param(2, "adamw", (3, 2), True, marks=SLOW),
    pytest.param(2, "sgd", (3, 2), False, marks=SLOW),  # a checkpoint saved before the layout file existed
])
def test_zero_state_moves_to_another_world_size_exactly(tmp_path, stage, optim, worlds, layout):
    from largessl.train.deepspeed_engine import CHECKPOINT_DIR, LAYOUT_FILE

    old, new = worlds
    before = assemble(run_distributed(_save, old, stage, optim, str(tmp_path)))
    merged = _merge(tmp_path, old)
    assert (merged / CHECKPOINT_DIR / LAYOUT_FILE).is_file()
    if not layout:
        (merged / CHECKPOINT_DIR / LAYOUT_FILE).unlink()
    out = run_distributed(_load, new, stage, optim, str(merged), old)
    after = assemble([pieces for pieces, _, _ in out])
    assert sorted(before) == sorted(after)
    keys = {k.rsplit("/", 1)[1] for k in before}
    expected = {"lars": {"mu"}, "sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq", "step"}}[optim]
    assert expected | {"fp32", "value"} == keys, keys
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # each new rank read exactly the old partitions holding a piece of what it now owns (all without the layout)
    every = sorted(p.relative_to(merged).as_posix() for p in merged.rglob("*optim_states.pt"))
    for _, wanted, needed in out:
        assert wanted == (needed if layout else every)
    if optim == "adamw":
        _same_as_deepspeeds_own_converter(merged, [tmp_path / f"load-w{new}-r{r}" for r in range(new)])


def _same_as_deepspeeds_own_converter(merged: Path, loads: list[Path]) -> None:
    """For Adam (the only state DeepSpeed's ds_to_universal knows), the per-parameter files each rank wrote are
    those of DeepSpeed's offline converter, tensor for tensor."""
    import subprocess
    import sys

    ref = merged.parent / "ds_to_universal" / "state"
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(merged / "deepspeed" / "state"), "--output_folder", str(ref), "--inject_missing_state",
                        "--num_extract_workers", "1", "--num_merge_workers", "1"],
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    compared = set()
    for load in loads:
        for ours in (load / "deepspeed" / "state" / "zero").glob("*/*.pt"):
            theirs = ref / "zero" / ours.parent.name / ours.name
            a, b = torch.load(ours, weights_only=False), torch.load(theirs, weights_only=False)
            if ours.name == "step.pt":
                assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), ours
            else:
                assert torch.equal(a["param"].flatten(), b["param"].flatten()), ours
            compared.add((ours.parent.name, ours.name))
    # every parameter, written by the new ranks together (DeepSpeed's converter adds fp32 copies of the module's
    # buffers, which its ZeRO-1/2 loader never reads; load_engine restores buffers from the module states)
    names = {p.parent.name for p in (ref / "zero").glob("*/exp_avg.pt")}
    assert {n for n, _ in compared} == names
    assert {k for _, k in compared} == {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt"}


def _zero0_state(engine) -> dict[str, torch.Tensor]:
    out = {f"module/{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    opt = engine.optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            out[f"optimizer/{pid}/{key}"] = torch.as_tensor(value).clone()
    return out


def _zero0_save(rank: int, world: int, folder: str):
    from largessl.train.deepspeed_engine import save_engine

    engine = _engine(rank, world, 0, "sgd")
    _train(engine, rank, range(3))
    save_engine(engine, Path(folder) / f"rank{rank}")
    return _zero0_state(engine)


def _zero0_load(rank: int, world: int, saved: str, saved_world: int):
    from largessl.train.deepspeed_engine import load_engine, partitions_to_read

    engine = _engine(rank, world, 0, "sgd")
    files = sorted(p.relative_to(saved).as_posix() for p in Path(saved).rglob("*") if p.is_file())
    assert partitions_to_read(engine, Path(saved), files) == []  # ZeRO-0: the optimizer is in the module states
    load_engine(engine, saved, saved_world)
    return _zero0_state(engine)


@SLOW
def test_zero0_state_moves_to_another_world_size_by_a_plain_load(tmp_path):
    """ZeRO-0 keeps the whole optimizer state in the module states file: any world size loads it as it is."""
    before = run_distributed(_zero0_save, 2, str(tmp_path))[0]  # rank 0's module states are the ones saved
    merged = _merge(tmp_path, 2)
    assert not list(merged.rglob("*optim_states.pt"))
    (after,) = run_distributed(_zero0_load, 1, str(merged), 2)
    assert sorted(before) == sorted(after) and any(k.endswith("momentum_buffer") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
