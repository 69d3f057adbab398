"""The run directory's lock: one process owns ``<run_dir>/run.lock`` for the run's life (a lease with a heartbeat).

A second ``largessl pretrain`` on the same ``train.run_dir`` must not run: it would delete the first run's staging
folders and replace its ``metrics.jsonl``. The lock is a small JSON lease::

    {"host": "node12", "boot_id": "...", "pid": 4242, "proc_start": "123456", "token": "9f0c...",
     "started_at": 1767000000.0, "heartbeat_at": 1767000090.0, "lease_s": 90.0, "command": "pretrain"}

**Taking it** is one exclusive create (``O_CREAT | O_EXCL``, atomic on local file systems and on NFS v3/v4). Whoever
creates the file owns the run; everyone else reads it and decides:

- the holder runs on this machine (same host name and kernel boot id) and its process is alive (same pid and the
  same process start time, so a recycled pid or a container's PID 1 is not mistaken for it): refused at once;
- the holder runs on this machine and its process is gone (SIGKILL, OOM): the lease is stale at once;
- the holder runs elsewhere: the lease is live while its heartbeat is younger than ``lease_s``. The contender
  watches the heartbeat: when it moves the holder is alive and the contender is refused (within about one
  heartbeat interval); when it does not move for ``lease_s`` the lease is stale. That is how a job requeued on
  another node after its predecessor was SIGKILLed takes over, after at most one lease.

A stale lease is removed by renaming it to a private name first (a rename succeeds for one contender only) and
checking that the renamed file is the stale lease that was read; then the exclusive create is retried.

**The heartbeat**: a daemon thread rewrites the lease every ``lease_s / 6`` (temp file + rename) with a new
``heartbeat_at``, and touches the file's mtime when the volume is full (readers take the later of the two, so a
full disk never makes a live run look dead). If it finds another process's token in the file, the lease was taken
over (this process missed its heartbeats for a whole lease): :meth:`RunLock.check` raises from then on.

Clocks: ``heartbeat_at`` is the holder's wall clock and the age is computed with the reader's; hosts of one
cluster agree within seconds, far below the lease (90 s by default, ``train.lock_lease_seconds``).

:func:`read_lock` and :func:`lock_status` are the read side (``largessl status`` tells a running run from a dead
one with them); they never modify anything.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from largessl.run.durable import fsync_dir
from largessl.run.layout import LOCK_FILE

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 90.0
"""Seconds without a heartbeat after which a lease held on another machine is stale."""
HEARTBEATS_PER_LEASE = 6


class RunLockedError(ValueError):
    """Another live process owns the run directory (exit code 2: this command must not run now)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: fields after the last ')' are fixed
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """What a run's lock file says (fields are empty/0 for a lock whose content could not be written: a full
    volume; then ``heartbeat_at`` is the file's mtime)."""

    host: str
    boot_id: str
    pid: int
    proc_start: str
    token: str
    started_at: float
    heartbeat_at: float
    lease_s: float
    command: str = ""

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat (by this machine's clock)."""
        return (time.time() if now is None else now) - self.heartbeat_at

    def on_this_machine(self) -> bool:
        """True when the holder runs on this machine (host name and kernel boot id match)."""
        return bool(self.host) and self.host == socket.gethostname() and self.boot_id == _boot_id()

    def holder_alive_here(self) -> bool:
        """On this machine: the holder's process still runs (pid and start time match). Meaningless elsewhere."""
        if not self.pid or not _pid_alive(self.pid):
            return False
        start = _proc_start(self.pid)
        return not (self.proc_start and start and start != self.proc_start)

    def stale(self, now: float | None = None) -> bool:
        """The lease no longer protects the run: its holder died on this machine, or its heartbeat is older
        than the lease (a holder elsewhere)."""
        if self.on_this_machine():
            return not self.holder_alive_here()
        return self.age(now) > self.lease_s

    def holder(self) -> str:
        """``pid 4242 on node12 (since 2026-01-01 12:00:00 UTC)`` for messages."""
        if not self.host:
            return "an unknown process (its lock file is empty: written on a full volume)"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at)) if self.started_at else "?"
        return f"pid {self.pid} on {self.host} (running {self.command or 'largessl'} since {since})"


def lock_path(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/run.lock``."""
    return Path(run_dir) / LOCK_FILE


def _parse(text: bytes, mtime: float) -> LockInfo:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        return LockInfo("", "", 0, "", "", 0.0, mtime, DEFAULT_LEASE_S)
    return LockInfo(host=str(data.get("host", "")), boot_id=str(data.get("boot_id", "")),
                    pid=int(data.get("pid", 0) or 0), proc_start=str(data.get("proc_start", "")),
                    token=str(data.get("token", "")), started_at=float(data.get("started_at", 0.0) or 0.0),
                    heartbeat_at=max(float(data.get("heartbeat_at", 0.0) or 0.0), mtime),
                    lease_s=float(data.get("lease_s", DEFAULT_LEASE_S) or DEFAULT_LEASE_S),
                    command=str(data.get("command", "")))


def read_lock(run_dir: str | os.PathLike[str]) -> LockInfo | None:
    """The lock of ``run_dir`` as it is now, or None when no process holds (or ever held) it. Reads only."""
    path = lock_path(run_dir)
    try:
        with open(path, "rb") as f:
            text = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return _parse(text, mtime)


def lock_status(run_dir: str | os.PathLike[str]) -> Literal["running", "stale", "free"]:
    """``running``: a live process owns the run; ``stale``: the owner died (its lease expired or its process is
    gone); ``free``: no lock."""
    info = read_lock(run_dir)
    if info is None:
        return "free"
    return "stale" if info.stale() else "running"


class RunLock:
    """The lease on one run directory; :meth:`acquire` takes it (or raises :class:`RunLockedError`), a heartbeat
    thread keeps it, :meth:`release` gives it back. Rank 0 of a run holds it."""

    def __init__(self, run_dir: str | os.PathLike[str], lease_s: float = DEFAULT_LEASE_S,
                 command: str = "pretrain") -> None:
        if lease_s <= 0:
            raise ValueError(f"the lock lease must be > 0 seconds (got {lease_s})")
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.lease_s = float(lease_s)
        self.command = command
        self.token = secrets.token_hex(8)
        self.started_at = time.time()
        self.held = False
        self.lost = ""
        """Why the lease was lost (taken over after missed heartbeats); empty while it is ours."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------
    # content

    def _content(self) -> bytes:
        pid = os.getpid()
        data = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "proc_start": _proc_start(pid),
                "token": self.token, "started_at": self.started_at, "heartbeat_at": time.time(),
                "lease_s": self.lease_s, "command": self.command}
        return (json.dumps(data, indent=1) + "\n").encode()

    def info(self) -> LockInfo:
        """This process's lease as a reader would see it."""
        return _parse(self._content(), 0.0)

    # -------------------------------------------------------------------------------------------
    # taking and giving back

    def _create(self) -> bool:
        """One exclusive create; True when this process now owns the lock file."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        except OSError as e:
            # A full volume: the empty file is still ours (its mtime is the heartbeat); the content is written by
            # the first heartbeat that finds room (the caller frees space: interrupted saves are removed next).
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            log.warning("%s: the volume is full, the lock holds no content until a heartbeat finds room", self.path)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        fsync_dir(self.run_dir)
        return True

    def _remove_stale(self, seen: LockInfo) -> None:
        """Move the stale lease ``seen`` out of the way (only one contender's rename succeeds)."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            with open(aside, "rb") as f:
                moved = _parse(f.read(), os.fstat(f.fileno()).st_mtime)
        except OSError:
            moved = seen
        if moved.token != seen.token:
            # Between our read and our rename another process took the lock over: put its lease back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise RunLockedError(f"train.run_dir {self.run_dir} was just taken over by {moved.holder()}")
        aside.unlink(missing_ok=True)
        log.warning("train.run_dir %s: took over the lock of %s (%s)", self.run_dir, seen.holder(),
                    "its process is gone" if seen.on_this_machine() else
                    f"no heartbeat for {seen.age():.0f}s, lease {seen.lease_s:.0f}s")

    def acquire(self, wait_s: float | None = None) -> RunLock:
        """Take the lock, or raise :class:`RunLockedError` naming the holder.

        A lease held on another machine is watched for up to ``wait_s`` (default: its lease plus one heartbeat
        interval): a moving heartbeat refuses, a lease that expires is taken over.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        watched: tuple[str, float] | None = None
        deadline: float | None = None
        while True:
            if self._create():
                self.held = True
                self._start_heartbeat()
                return self
            info = read_lock(self.run_dir)
            if info is None:
                continue  # released between our create and our read
            if info.stale():
                self._remove_stale(info)
                continue
            if info.on_this_machine() or not info.host:
                raise RunLockedError(self._refusal(info))  # alive here, or an empty lease whose mtime is fresh
            now = time.monotonic()
            if watched is None:
                watched = (info.token, info.heartbeat_at)
                deadline = now + (wait_s if wait_s is not None else info.lease_s + info.lease_s / HEARTBEATS_PER_LEASE)
                log.info("train.run_dir %s is locked by %s (last heartbeat %.0fs ago); watching its heartbeat",
                         self.run_dir, info.holder(), info.age())
            elif (info.token, info.heartbeat_at) != watched or (deadline is not None and now > deadline):
                raise RunLockedError(self._refusal(info))
            time.sleep(min(1.0, max(0.05, info.lease_s / (4 * HEARTBEATS_PER_LEASE))))

    def _refusal(self, info: LockInfo) -> str:
        return (f"train.run_dir {self.run_dir} is in use by {info.holder()}; its lock {self.path} had a heartbeat "
                f"{max(0.0, info.age()):.0f}s ago. Two runs on one run directory would overwrite each other's "
                "checkpoints and metrics: wait for it to end, stop it, or use another train.run_dir. A lock left by a "
                f"killed run expires by itself ({info.lease_s:.0f}s without heartbeat; at once on the same machine)")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.held:
            return
        self.held = False
        info = read_lock(self.run_dir)
        if info is not None and (info.token == self.token or not info.token) and not self.lost:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -------------------------------------------------------------------------------------------
    # the heartbeat

    def renew(self) -> None:
        """Write a new heartbeat (temp file + rename; on a full volume touch the file instead)."""
        current = read_lock(self.run_dir)
        if current is None or (current.token and current.token != self.token):
            self.lost = (f"the lock {self.path} was taken over by {current.holder()}" if current is not None
                         else f"the lock {self.path} was removed by another process")
            return
        tmp = self.path.with_name(f".{LOCK_FILE}.tmp-{self.token}")
        try:
            with open(tmp, "wb") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            os.utime(self.path)  # no data needed: the mtime is the heartbeat

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="largessl-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.lease_s / HEARTBEATS_PER_LEASE
        while not self._stop.wait(interval):
            try:
                self.renew()
            except OSError as e:  # a storage hiccup: the next beat retries; the lease allows several misses
                log.warning("could not renew the run lock %s: %s", self.path, e)
            if self.lost:
                log.error("%s; this run no longer owns train.run_dir %s", self.lost, self.run_dir)
                return

    def check(self) -> None:
        """Raise ``RuntimeError`` when the lease was lost (another process took the run over)."""
        if self.lost:
            raise RuntimeError(f"{self.lost}: this process missed its heartbeats for a whole lease "
                               f"({self.lease_s:.0f}s) and must not write the run directory any more")


def lock_info_dict(info: LockInfo) -> dict[str, Any]:
    """A lock's fields as a plain dict (for status output)."""
    return asdict(info)
