"""``largessl launch node``: start this node's ranks with torchrun's variables, keep their exit codes.

Used inside Kubernetes pods with several GPUs, and on one machine instead of ``torchrun --standalone``
(``largessl launch node --nproc-per-node 8 -- pretrain ...``: without the pod contract every rank runs here,
rendezvous on 127.0.0.1). In a pod it reads the pod contract (``JOB_COMPLETION_INDEX``,
``LARGESSL_WORLD_SIZE``, ``LARGESSL_JOB_NAME``, ``LARGESSL_MASTER_SERVICE``, ``MASTER_PORT``), starts
``--nproc-per-node`` processes of ``largessl <command>`` with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, forwards SIGTERM/SIGUSR1/SIGUSR2 to them and waits
without a deadline of its own (the pod's terminationGracePeriodSeconds bounds the final checkpoint).

Why not torchrun: it reports any worker failure as exit code 1 and kills workers 30 s after SIGTERM, so
a Kubernetes podFailurePolicy could not tell a bug (fail fast) from a preemption (requeue, 75).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

from largessl.distributed.env import DEFAULT_PORT
from largessl.run import exit_codes

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def _int(env: Mapping[str, str], key: str) -> int:
    if key not in env:
        raise RuntimeError(f"{key} is not set: `largessl launch node` runs inside a pod rendered by "
                           "`largessl launch k8s` (or with that environment)")
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def rank_environments(environ: Mapping[str, str], nproc_per_node: int) -> list[dict[str, str]]:
    """The full environment of each local rank of this node (pure: pass ``environ`` to test)."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1 (got {nproc_per_node})")
    if "JOB_COMPLETION_INDEX" not in environ and "LARGESSL_WORLD_SIZE" not in environ:
        # one machine, as `torchrun --standalone`: every rank here, rendezvous on the loopback
        environ = {**environ, "JOB_COMPLETION_INDEX": "0", "LARGESSL_WORLD_SIZE": str(nproc_per_node),
                   "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1")}
    node = _int(environ, "JOB_COMPLETION_INDEX")
    world = _int(environ, "LARGESSL_WORLD_SIZE")
    if world % nproc_per_node:
        raise ValueError(f"LARGESSL_WORLD_SIZE={world} is not a multiple of --nproc-per-node={nproc_per_node}")
    if not 0 <= node < world // nproc_per_node:
        raise RuntimeError(f"JOB_COMPLETION_INDEX={node} is outside the {world // nproc_per_node} node(s) of the job")
    master = environ.get("MASTER_ADDR")
    if not master:
        job, service = environ.get("LARGESSL_JOB_NAME"), environ.get("LARGESSL_MASTER_SERVICE")
        if not job or not service:
            raise RuntimeError("set MASTER_ADDR or LARGESSL_JOB_NAME and LARGESSL_MASTER_SERVICE "
                               "(node 0's address is <job>-0.<service>)")
        master = f"{job}-0.{service}"
    port = environ.get("MASTER_PORT", str(DEFAULT_PORT))
    envs = []
    for local in range(nproc_per_node):
        env = dict(environ)
        env.update(RANK=str(node * nproc_per_node + local), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                   LOCAL_WORLD_SIZE=str(nproc_per_node), GROUP_RANK=str(node), MASTER_ADDR=master,
                   MASTER_PORT=port)
        envs.append(env)
    return envs


def combine_exit_codes(codes: list[int]) -> int:
    """One code for the pod: a fail-fast code wins, then any other failure, then 0."""
    for c in codes:
        if c in exit_codes.FAIL_FAST:
            return c
    for c in codes:
        if c != exit_codes.OK:
            return c if c > 0 else exit_codes.ENVIRONMENT  # killed by a signal: an environment failure
    return exit_codes.OK


def run_node(command: list[str], nproc_per_node: int, environ: Mapping[str, str] | None = None,
             failure_grace_s: float = 60.0) -> int:
    """Run ``largessl <command>`` as this node's ranks; returns the combined exit code."""
    envs = rank_environments(os.environ if environ is None else environ, nproc_per_node)
    procs = [subprocess.Popen([sys.executable, "-m", "largessl", *command], env=env) for env in envs]
    log.info("node %s: started ranks %s of %s", envs[0]["GROUP_RANK"], [e["RANK"] for e in envs],
             envs[0]["WORLD_SIZE"])

    def forward(signum: int, frame: FrameType | None) -> None:
        # every rank must see the stop request; the trainer agrees on it at the next step boundary
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    killed: set[int] = set()
    try:
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode is not None]
            if failed_at is None and any(c not in (exit_codes.OK, exit_codes.REQUEUE) for c in codes):
                # a failed rank leaves the others blocked in a collective: stop them rather than wait for
                # the collective timeout
                failed_at = time.monotonic()
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > failure_grace_s:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        killed.add(i)
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for i, p in enumerate(procs) if i not in killed]
    code = combine_exit_codes(codes)
    log.info("node %s: rank exit codes %s -> %d", envs[0]["GROUP_RANK"], [p.returncode for p in procs], code)
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl launch node``."""
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes (GPUs) on this node")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the largessl command for every rank, after --, e.g. -- pretrain --config c.yaml")


def run(args: argparse.Namespace) -> int:
    """Entry of ``largessl launch node``."""
    command = [c for c in args.command]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("give the command to run after --, e.g. largessl launch node --nproc-per-node 8 -- "
                         "pretrain --config /etc/largessl/config.yaml")
    return run_node(command, args.nproc_per_node)
