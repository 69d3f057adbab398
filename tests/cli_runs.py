"""Real ``largessl pretrain`` processes (the console entry, as schedulers run it) on the digits shards.

For tests of what a scheduler sees: exit codes, the last log line, signals to the process group, dead
peers. Every process is ``python -m largessl pretrain ...`` with torchrun's variables for several ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from largessl.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["model.arch=repro_convnet", "method.projector=32-32", "data.image_size=16", "data.augment=small",
         "data.shuffle_buffer=16", "train.global_batch_size=16", "optim.warmup_epochs=1", "train.log_every=1",
         "train.collapse_every=1000", "train.device=cpu", "log.progress=false", "log.tensorboard=false",
         "eval.online_probe=false", "data.prefetch_factor=1"]
"""A run that takes well under a second per step on one CPU core."""


def env_for(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """The environment of rank ``rank``: torchrun's variables for several ranks, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    if world > 1:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def start(overrides: list[str], log_dir: Path, world: int = 1, new_session: bool = False,
          **extra_env: str) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``python -m largessl pretrain`` (logs in ``log_dir/<name>-rank<r>.log``)."""
    port = free_port()
    procs = []
    stamp = time.monotonic_ns()
    for rank in range(world):
        out = open(log_dir / f"{stamp}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "largessl", "pretrain", *overrides],
                                      env=env_for(rank, world, port, **extra_env), stdout=out,
                                      stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=new_session))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Exit codes (stragglers are killed after ``timeout``)."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def steps(run_dir: Path) -> list[int]:
    """Logged steps of metrics.jsonl (torn lines and ``event`` records, e.g. an allowed config change, skipped)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
            if "event" not in rec:
                out.append(int(rec["step"]))
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Block until metrics.jsonl shows ``step`` (fails if a process exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in steps(run_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a training process exited early with {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout}s")


def logs(log_dir: Path) -> str:
    """Every log of ``log_dir``, for assertion messages."""
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob("*.log")))


def last_line(log: Path) -> str:
    """The last non-empty line of a log (what the scheduler shows)."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""
