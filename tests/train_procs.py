"""Launch real training processes (1 or several ranks, torchrun-style environment) for trainer tests.

Two entry points, both with the probes of :mod:`run_probes` (signals received, sample keys trained on):
:func:`launch` runs the trainer on :mod:`synthetic_stream` (no data pipeline), :func:`launch_pretrain` runs
the real ``largessl pretrain`` CLI on a shard manifest.
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

TINY = ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32", "train.log_every=1",
        "train.collapse_every=1000", "train.deterministic=true", "optim.warmup_epochs=1", "log.progress=false",
        "log.tensorboard=false", "eval.online_probe=false", "data.num_workers=0", "checkpoint.every_steps=3"]

SHARDS_TINY = ["model.arch=repro_convnet", "method.projector=32-32", "data.augment=small", "data.image_size=16",
               "data.shuffle_buffer=8", "data.pin_memory=false", "train.device=cpu", "train.log_every=1",
               "train.collapse_every=1000", "train.deterministic=true", "optim.warmup_epochs=1",
               "log.progress=false", "log.tensorboard=false", "eval.online_probe=false", "checkpoint.every_steps=3"]
"""A tiny CPU pretraining on 16-px digits shards (see :func:`write_small_digits`): ~0.1 s per step."""


def write_small_digits(dest: Path) -> str:
    """``largessl shards digits DEST --image-size 16 --val-fraction 0.95``: 90 train samples in 7 uneven shards
    (a run crosses epoch boundaries within a few steps); returns the train manifest path."""
    out = subprocess.run([sys.executable, "-m", "largessl", "shards", "digits", str(dest), "--image-size", "16",
                          "--val-fraction", "0.95"], env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[0]


def _spawn(world: int, argv: list[str], log_dir: Path, env_extra: dict[str, str] | None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)
        out = open(log_dir / f"rank{rank}-{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT))
    return procs


def launch(world: int, num_samples: int, overrides: list[str], log_dir: Path,
           env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``world`` ranks of tests/synthetic_stream.py with torchrun's environment variables."""
    return _spawn(world, [str(ROOT / "tests" / "synthetic_stream.py"), str(num_samples), *overrides], log_dir, env)


def launch_pretrain(world: int, overrides: list[str], log_dir: Path,
                    env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``largessl pretrain`` (via tests/recorded_pretrain.py) with torchrun's variables."""
    return _spawn(world, [str(ROOT / "tests" / "recorded_pretrain.py"), *overrides], log_dir, env)


def probe_env(record_dir: Path, hold_after_step: int | None = None) -> dict[str, str]:
    """Environment that turns on the probes of :mod:`run_probes`."""
    env = {"LARGESSL_TEST_RECORD_DIR": str(record_dir)}
    if hold_after_step is not None:
        env["LARGESSL_TEST_HOLD_AFTER_STEP"] = str(hold_after_step)
    return env


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    """Exit codes of every process (kills stragglers once ``timeout`` seconds have passed in all)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def logged_steps(run_dir: Path) -> list[dict]:
    """Logged-step records of metrics.jsonl (torn lines and ``event`` records, e.g. an allowed config change,
    skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" not in rec:
            out.append(rec)
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
