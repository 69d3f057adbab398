"""Launch real training processes (1 or several ranks, torchrun-style environment) for trainer tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from largessl.dist.env import free_port

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "train.log_every=1",
        "train.collapse_every=1000", "train.deterministic=true", "optim.warmup_epochs=1", "log.progress=false",
        "log.tensorboard=false", "eval.online_probe=false", "data.num_workers=0", "checkpoint.every_steps=3"]


def launch(world: int, num_samples: int, overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Start ``world`` ranks of tests/synthetic_stream.py with torchrun's environment variables."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = open(log_dir / f"rank{rank}-{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "synthetic_stream.py"), str(num_samples),
                                       *overrides], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Exit codes of every process (kills stragglers after ``timeout``)."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def logged_steps(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl (torn lines skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Block until metrics.jsonl shows ``step`` (fails if a process exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in logged_steps(run_dir)):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a training process exited early with {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout}s")


def dump_logs(log_dir: Path) -> str:
    """All rank logs, for assertion messages."""
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
