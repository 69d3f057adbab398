"""Run a function on W real gloo processes on 127.0.0.1 and collect each rank's return value.

Not a mock: every rank is a separate process with its own default process group.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largessl.distributed.env import free_port


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, done: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        # Tensors travel through shared memory owned by this process: stay alive until the parent has them.
        done.wait(timeout=600)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; returns results in rank order.

    ``fn`` must be a module-level function (it is pickled into spawned processes); results must be
    picklable (tensors are fine).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    done = ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, done))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, out = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{out}")
            else:
                results[rank] = out
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
