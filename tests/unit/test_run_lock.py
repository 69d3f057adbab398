"""The run directory's lease (largessl.run.lock): exclusive, refused while its holder lives, stale when the holder
died (at once on this machine, after the lease elsewhere), heartbeat-watched, and readable for a status command.

The holders are real processes (a holder on "another machine" is a lock file written with another host name and,
for a live one, a thread that keeps its heartbeat moving, as the remote holder's own thread would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from largessl.run.lock import RunLock, RunLockedError, lock_status, read_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from largessl.run.lock import RunLock
    lock = RunLock(sys.argv[1], lease_s=float(sys.argv[2])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(run_dir: Path, lease_s: float = 30.0) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(lease_s)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _foreign_lock(run_dir: Path, heartbeat_age: float, lease_s: float, token: str = "remote") -> None:
    now = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps({
        "host": "some-other-node", "boot_id": "x", "pid": 1, "proc_start": "1", "token": token,
        "started_at": now - 100, "heartbeat_at": now - heartbeat_age, "lease_s": lease_s, "command": "pretrain"}))
    os.utime(run_dir / "run.lock", (now - heartbeat_age, now - heartbeat_age))


def test_acquire_release_and_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert read_lock(run) is None and lock_status(run) == "free"
    lock = RunLock(run, lease_s=30).acquire()
    info = read_lock(run)
    assert info is not None and info.pid == os.getpid() and info.token == lock.token and info.lease_s == 30
    assert info.on_this_machine() and info.holder_alive_here() and not info.stale()
    assert lock_status(run) == "running"
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):  # a second owner in the same process too
        RunLock(run).acquire()
    lock.release()
    assert not (run / "run.lock").exists() and lock_status(run) == "free"


def test_a_live_holder_here_refuses_at_once_and_a_killed_one_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid}"):
            RunLock(run, lease_s=30).acquire()
        assert time.monotonic() - t0 < 5  # same machine: no need to watch the heartbeat
        assert lock_status(run) == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves the file; the dead pid makes it stale at once on this machine (no lease to wait out)
    assert (run / "run.lock").exists() and lock_status(run) == "stale"
    t0 = time.monotonic()
    lock = RunLock(run, lease_s=30).acquire()
    assert time.monotonic() - t0 < 5 and read_lock(run).token == lock.token
    lock.release()


def test_a_holder_elsewhere_expires_after_its_lease(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _foreign_lock(run, heartbeat_age=10, lease_s=5)  # last heartbeat 10 s ago, lease 5 s: dead
    assert lock_status(run) == "stale"
    lock = RunLock(run, lease_s=5).acquire()
    assert read_lock(run).token == lock.token
    lock.release()
    # a fresh lease that stops moving is waited out, then taken over
    _foreign_lock(run, heartbeat_age=0, lease_s=1.5)
    t0 = time.monotonic()
    lock = RunLock(run, lease_s=5).acquire()
    assert 1.0 < time.monotonic() - t0 < 10
    lock.release()


def test_a_moving_heartbeat_elsewhere_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _foreign_lock(run, heartbeat_age=0, lease_s=2)
    stop = threading.Event()

    def beat() -> None:  # the remote holder's heartbeat thread
        while not stop.wait(0.2):
            data = json.loads((run / "run.lock").read_text())
            data["heartbeat_at"] = time.time()
            tmp = run / ".beat"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, run / "run.lock")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match="some-other-node"):
            RunLock(run, lease_s=2).acquire()
        assert time.monotonic() - t0 < 2  # refused as soon as the heartbeat moved, not after the lease
    finally:
        stop.set()
        t.join()


def test_heartbeat_renews_and_detects_a_takeover(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = RunLock(run, lease_s=0.6).acquire()  # beats every 0.1 s
    first = read_lock(run).heartbeat_at
    deadline = time.monotonic() + 10
    while read_lock(run).heartbeat_at == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_lock(run).heartbeat_at > first
    lock.check()
    _foreign_lock(run, heartbeat_age=0, lease_s=60, token="thief")  # someone took the run over
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "taken over" in lock.lost
    with pytest.raises(RuntimeError, match="must not write the run directory"):
        lock.check()
    lock.release()
    assert read_lock(run).token == "thief"  # never removes a lock that is not its own


def test_an_empty_lock_file_counts_by_its_mtime(tmp_path: Path) -> None:
    """A lock created on a full volume holds no content; its mtime is the heartbeat."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").touch()
    info = read_lock(run)
    assert info is not None and not info.host and not info.stale()
    with pytest.raises(RunLockedError, match="unknown process"):
        RunLock(run).acquire()
    old = time.time() - 1000
    os.utime(run / "run.lock", (old, old))
    assert lock_status(run) == "stale"
    RunLock(run).acquire().release()
