"""Distributed bootstrap: read rank/world from torchrun, SLURM or a Kubernetes Indexed Job, then init.

The environment is read once into a :class:`DistEnv` value and passed down explicitly; there are no
module-level rank globals.

Failure bounds (docs/operations.md): the ranks wait ``rendezvous_timeout_minutes`` for each other at start-up;
after that every collective times out after ``timeout_minutes`` (gloo raises; NCCL's watchdog aborts the
communicator, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``, and the waiting call raises), and the CLI turns the error
into exit code 3. :class:`StallWatchdog` is the backstop for waits no timeout covers.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"
    """Which launcher the values came from: single, torchrun, slurm, k8s."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ("node[03-05,7],gpu1" → "node03") without calling scontrol."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else the first entry of SLURM_TASKS_PER_NODE ("4(x2),2" → 4)."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        head = env.get(key, "").split(",")[0].split("(")[0]
        if head.isdigit():
            return int(head)
    return 1


def _checked(env: DistEnv) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise RuntimeError(f"rank {env.rank} is outside world size {env.world_size} ({env.source} environment)")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise RuntimeError(f"local rank {env.local_rank} is outside local world size {env.local_world_size} "
                           f"({env.source} environment)")
    return env


def _slurm_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from the job id so concurrent jobs on a node differ."""
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    job = env.get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's index among the processes of its node: ``LOCAL_RANK`` (torchrun, submitit), else
    ``SLURM_LOCALID`` (plain ``srun`` sets no ``LOCAL_RANK``), else 0."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in env:
            return _int(env, key)
    return 0


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the process's place in the job from the environment (pure: pass ``environ`` to test).

    Order: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), Kubernetes Indexed Job
    (``JOB_COMPLETION_INDEX`` + ``LARGESSL_MASTER_SERVICE``, one pod per node running torchrun sets
    torchrun's variables, so this branch is for one-process-per-pod jobs), SLURM (``SLURM_PROCID``…,
    which submitit's TorchDistributedEnvironment also exports as torchrun-style variables), else one process.
    """
    env = os.environ if environ is None else environ
    return _checked(_detect(env))


def _detect(env: Mapping[str, str]) -> DistEnv:
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=local_rank_from_env(env),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            source="torchrun",
        )
    if "JOB_COMPLETION_INDEX" in env and "LARGESSL_WORLD_SIZE" in env:
        service = env.get("LARGESSL_MASTER_SERVICE", "")
        job = env.get("LARGESSL_JOB_NAME", "")
        if not service or not job:
            raise RuntimeError(
                "Kubernetes Indexed Job detected (JOB_COMPLETION_INDEX set) but LARGESSL_MASTER_SERVICE or "
                "LARGESSL_JOB_NAME is missing; render the manifest with `largessl launch k8s`"
            )
        index = _int(env, "JOB_COMPLETION_INDEX")
        return DistEnv(
            rank=index,
            world_size=_int(env, "LARGESSL_WORLD_SIZE"),
            local_rank=0,
            local_world_size=1,
            master_addr=env.get("MASTER_ADDR", f"{job}-0.{service}"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            source="k8s",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=_slurm_tasks_per_node(env),
            master_addr=env.get("MASTER_ADDR", _first_slurm_host(nodelist)),
            master_port=_slurm_port(env),
            source="slurm",
        )
    return DistEnv()


BACKEND_NAMES = ("gloo", "nccl")
DEVICE_TYPES = ("cpu", "cuda")


def parse_backend(spec: str) -> dict[str, str]:
    """``"cpu:gloo,cuda:nccl"`` → ``{"cpu": "gloo", "cuda": "nccl"}``; a plain name maps to ``{"*": name}``.

    Raises ``ValueError`` naming the bad part, so ``dist.backend`` typos fail before any work.
    """
    spec = spec.strip()
    if ":" not in spec:
        if spec not in ("auto", *BACKEND_NAMES):
            raise ValueError(f"dist.backend={spec!r} is not auto, gloo, nccl or a device map such as "
                             "'cpu:gloo,cuda:nccl'")
        return {"*": spec}
    out: dict[str, str] = {}
    for part in spec.split(","):
        dev, _, name = part.strip().partition(":")
        if dev not in DEVICE_TYPES or name not in BACKEND_NAMES:
            raise ValueError(f"dist.backend={spec!r}: {part.strip()!r} is not DEVICE:BACKEND with DEVICE in "
                             f"{DEVICE_TYPES} and BACKEND in {BACKEND_NAMES}")
        if dev in out:
            raise ValueError(f"dist.backend={spec!r} names device {dev!r} twice")
        if dev == "cpu" and name == "nccl":
            raise ValueError(f"dist.backend={spec!r}: NCCL has no CPU backend; use cpu:gloo")
        out[dev] = name
    return out


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend string of the default group for a run on ``device``.

    On CUDA, ``auto`` and ``nccl`` give ``cpu:gloo,cuda:nccl``: NCCL carries every tensor collective, and
    gloo serves CPU object collectives (and would catch a stray CPU tensor instead of crashing). Every
    tensor collective of largessl still runs on the training device; the CPU half is a safety net, not a
    path. A device map (``cuda:nccl``, or ``cuda:gloo`` for two processes on one GPU in the GPU test
    tier) is used as given, so a group without a CPU backend can be asked for on purpose. On CPU the
    backend is gloo.
    """
    mapping = parse_backend(requested)
    if "*" in mapping:
        name = mapping["*"]
        if device.type == "cuda":
            return "cpu:gloo,cuda:nccl" if name in ("auto", "nccl") else name
        if name == "nccl":
            raise ValueError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on CPU")
        return "gloo"
    if device.type not in mapping:
        raise ValueError(f"dist.backend={requested!r} has no backend for this run's {device.type} device")
    return requested.replace(" ", "")


NCCL_ERROR_HANDLING = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
"""On a collective timeout or NCCL error, abort the communicator so the waiting call raises (mode 2) instead of
tearing the process down with SIGABRT (modes 1 and 3), which would hide the exit code 3 the schedulers act on.
Set in the environment before the process group exists; an explicit user setting wins."""


def configure_nccl_error_handling(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set NCCL's async error handling unless the user chose a mode; returns the values in effect."""
    env = os.environ if environ is None else environ
    for key, value in NCCL_ERROR_HANDLING.items():
        env.setdefault(key, value)
    return {k: env[k] for k in NCCL_ERROR_HANDLING}


def torchrun_restart_hazard(environ: Mapping[str, str] | None = None) -> str:
    """Why this torchrun job's restarts will fail, or "" (torch 2.14's agent store, found in issue 26's tests).

    With ``--max-restarts`` > 0, torchrun's agents keep one key-value store for their workers across restarts by
    default: restarted workers read the previous round's gloo addresses and fail to connect, and an agent that
    rejoins an elastic job waits for an address that is never republished. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    on the agents gives every round a fresh store (c10d rendezvous); static rendezvous has no such switch.
    """
    env = os.environ if environ is None else environ
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return ""
    if restarts <= 0 or env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return ""
    return ("torchrun shares its agent's store with the workers across restarts (--max-restarts "
            f"{restarts}): restarted workers would meet at the previous round's addresses and fail, and a rejoining "
            "agent would wait forever. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of every torchrun "
            "agent with --rdzv-backend c10d; with static rendezvous use --max-restarts 0 and let the scheduler "
            "restart the job (docs/operations.md)")


def init_distributed(env: DistEnv, backend: str = "gloo", timeout_minutes: float = 4.0,
                     rendezvous_timeout_minutes: float = 30.0, device: torch.device | None = None) -> None:
    """Initialise the default process group for ``env`` (no-op for a single process).

    ``rendezvous_timeout_minutes`` bounds the wait for every rank to arrive; ``timeout_minutes`` bounds every
    collective afterwards (a dead peer then fails the survivors instead of hanging them). ``device`` is the
    training device; on CUDA it is made current before the group exists (NCCL binds each rank's
    communicator to the current device, and object collectives stage through it).
    """
    if not env.distributed or dist.is_initialized():
        return
    kwargs = {}
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
        if "nccl" in backend:
            kwargs["device_id"] = device  # eager NCCL init on the right GPU; no device guess at the first barrier
    if "nccl" in backend:
        configure_nccl_error_handling()
    hazard = torchrun_restart_hazard() if env.source == "torchrun" else ""
    if hazard and env.rank == 0:
        log.warning(hazard)
    try:
        store = _rendezvous_store(env, rendezvous_timeout_minutes)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    except Exception as e:  # rendezvous failures come as many exception types
        raise RuntimeError(
            f"rendezvous failed for rank {env.rank}/{env.world_size} at {env.master_addr}:{env.master_port} "
            f"({env.source}): {e}"
        ) from e
    log.info("process group ready: %s, rank %d of %d (%s); collective timeout %g min", backend, env.rank,
             env.world_size, env.source, timeout_minutes)


def _rendezvous_store(env: DistEnv, timeout_minutes: float) -> dist.TCPStore:
    """The TCP key-value store on rank 0's address that the ranks meet at (its own, longer timeout)."""
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0,
                         timeout=datetime.timedelta(minutes=timeout_minutes), wait_for_workers=True)


class StallWatchdog:
    """Ends the process with ``exit_code`` when no progress is reported for ``timeout_s`` seconds.

    The backstop for a rank stuck waiting on a dead or frozen peer where no timeout fires (a collective
    without one, a hung NCCL kernel): the process exits 3 so the scheduler restarts the job, which resumes
    from the last checkpoint. Armed by the first :meth:`beat`, so start-up (resume, the first compile) never
    counts; :meth:`paused` covers work with its own bounds (checkpoint reads and writes).
    """

    def __init__(self, timeout_s: float, exit_code: int = 3, what: str = "training step",
                 poll_s: float | None = None, on_expire: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock  # injectable so tests drive time instead of sleeping against it
        self.exit_code = exit_code
        self.what = what
        self.poll_s = poll_s if poll_s is not None else max(0.05, min(5.0, timeout_s / 10))
        self.on_expire = on_expire or self._exit
        self._last: float | None = None
        self._paused = 0
        self.polls = 0  # checks made so far (tests wait on it instead of sleeping)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StallWatchdog:
        """Start the watching thread (a daemon; it never keeps the process alive)."""
        self._thread = threading.Thread(target=self._run, name="largessl-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        """Report progress (cheap: one attribute store, no lock)."""
        self._last = self.clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count the time spent inside this block."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = self.clock()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.polls += 1
            last = self._last
            if last is None or self._paused:
                continue
            idle = self.clock() - last
            if idle > self.timeout_s:
                self.on_expire(f"no {self.what} completed for {idle:.0f} s (limit {self.timeout_s:.0f} s): a peer "
                               "rank died or hangs; exiting so the job can be restarted from the last checkpoint")
                return

    def _exit(self, message: str) -> None:
        log.error("%s (exit code %d)", message, self.exit_code)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os._exit(self.exit_code)  # the main thread is stuck in a call that cannot be interrupted


def stall_timeout_s(timeout_minutes: float) -> float:
    """The watchdog's limit: the collective timeout plus a margin (min(timeout, 1 min)) so that the collective's
    own error, with its clearer message, normally comes first. Default 4 + 1 = 5 minutes."""
    t = timeout_minutes * 60.0
    return t + min(t, 60.0)


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RankFilter(logging.Filter):
    """Lets every record through on rank 0 and only warnings and errors elsewhere, prefixed by rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(env: DistEnv, level: str = "INFO") -> None:
    """Install the rank filter once on the root handler (called by the CLI at bootstrap)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_largessl", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler._largessl = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    handler.addFilter(RankFilter(env.rank))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
