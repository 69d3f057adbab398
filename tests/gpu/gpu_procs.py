"""Processes for the GPU tier: ranks that share one GPU (backend ``cuda:gloo``), launched like torchrun would.

NCCL refuses two ranks on the same device, so the multi-rank GPU tests use gloo's CUDA collectives. A
``cuda:gloo`` group has no CPU backend, exactly like NCCL: any CPU tensor handed to a collective fails
there as it would on a real multi-GPU job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_runs import logs, wait
from train_procs import logged_steps as records

from largessl.distributed.env import free_port

__all__ = ["ROOT", "logs", "pretrain", "records", "run_on_one_gpu", "signal_at_step", "wait"]

ROOT = Path(__file__).resolve().parents[2]


def pretrain(world: int, overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """``world`` ranks of ``largessl pretrain`` on GPU 0 (each believes it is local rank 0 of its own node)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(log_dir / f"rank{rank}-{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "largessl", "pretrain", *overrides], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def signal_at_step(run_dir: Path, step: int, proc: subprocess.Popen, procs: list[subprocess.Popen],
                   timeout: float = 240) -> None:
    """SIGTERM ``proc`` once metrics.jsonl shows ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in records(run_dir)):
            proc.send_signal(signal.SIGTERM)
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_one_gpu(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` processes sharing GPU 0 over a ``cuda:gloo`` group.

    Results must be picklable without CUDA (return numpy arrays or CPU tensors converted to numpy).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout)
            (errors.append(f"rank {rank}:\n{out}") if status == "error" else results.__setitem__(rank, out))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("GPU worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
