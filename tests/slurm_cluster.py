"""A real single-node SLURM cluster for the integration tests (munge + slurmctld + slurmd on this host).

Needs root and apt (CI runs as root on a fresh Debian/Ubuntu machine): missing packages are installed
with apt-get, a minimal ``slurm.conf`` for this host is written, the daemons are started and the
fixture waits until ``sinfo`` shows the node idle. A cluster that already answers is reused and left
running; daemons this module started are stopped at session end. Where any of this is impossible the
fixture skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CONF_DIR = Path("/etc/slurm")
CONF = CONF_DIR / "slurm.conf"
STATE = Path("/var/spool/largessl-slurm")
MUNGE_KEY = Path("/etc/munge/munge.key")
MARKER = "# written by largessl tests/slurm_cluster.py"
PARTITION = "debug"
PACKAGES = ("slurm-wlm", "munge")


class Unavailable(Exception):
    """This machine cannot host the test cluster (the message says why)."""


@dataclass
class SlurmCluster:
    """Handle on the running test cluster."""

    host: str
    cpus: int
    partition: str = PARTITION
    started: list[Path] = field(default_factory=list)
    """Pid files of the daemons this session started (and must stop)."""

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command and return its completed process."""
        return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)

    def job_field(self, job_id: str, name: str) -> str:
        """One field of ``scontrol show job`` (works without accounting storage)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
        return ""


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
    """Poll ``condition`` until it returns a truthy value or ``timeout`` seconds pass (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _sh(*cmd: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)


def _install_packages() -> None:
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise Unavailable(f"SLURM binaries {missing} are missing and apt-get is not available to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ("-o", "DPkg::Lock::Timeout=300")
    upd = _sh("apt-get", *lock, "update", env=env)
    if upd.returncode:
        raise Unavailable(f"apt-get update failed: {upd.stderr.strip()[-400:]}")
    inst = _sh("apt-get", *lock, "install", "-y", "--no-install-recommends", *PACKAGES, env=env)
    if inst.returncode:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {inst.stderr.strip()[-400:]}")
    still = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if still:
        raise Unavailable(f"installed {PACKAGES} but {still} are still not on PATH")


def _munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    enc = _sh("munge", "-n", timeout=10)
    if enc.returncode:
        return False
    dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, text=True, timeout=10)
    return dec.returncode == 0


def _start_munge() -> None:
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    # munged refuses to run as root; run it as its own user like the init script does
    res = _sh("runuser", "-u", "munge", "--", "munged", timeout=30)
    if res.returncode:
        raise Unavailable(f"munged did not start: {res.stderr.strip()[-400:]}")
    wait_for(_munge_works, 20, "munged to answer")


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _write_conf(host: str, cpus: int) -> None:
    for sub in ("ctld", "d"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    # Leave headroom: slurmd refuses a node whose RealMemory exceeds what it measures.
    mem = max(256, int(_mem_mb() * 0.8))
    text = f"""{MARKER}
ClusterName=largessl
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire seconds (default 120) before they may start again
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation={STATE / "ctld"}
SlurmdSpoolDir={STATE / "d"}
SlurmctldPidFile={STATE / "slurmctld.pid"}
SlurmdPidFile={STATE / "slurmd.pid"}
SlurmctldLogFile={STATE / "slurmctld.log"}
SlurmdLogFile={STATE / "slurmd.log"}
SlurmctldPort=6817
SlurmdPort=6818
# jobs stay visible to scontrol long after they end (there is no accounting database to ask)
MinJobAge=3600
# time between SIGTERM and SIGKILL on requeue/cancel: the trainer's final checkpoint fits in it
KillWait=60
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    if CONF.exists() and MARKER not in CONF.read_text():
        raise Unavailable(f"{CONF} exists and was not written by the tests; refusing to overwrite it")
    CONF.write_text(text)


def _node_state(host: str) -> str:
    res = _sh("sinfo", "-h", "-N", "-n", host, "-o", "%T", timeout=15)
    return res.stdout.strip().lower() if res.returncode == 0 else ""


def _daemon_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def start_cluster() -> SlurmCluster:
    """Bring up (or reuse) the cluster; raises :class:`Unavailable` where it cannot run."""
    if os.name != "posix" or os.geteuid() != 0:
        raise Unavailable("the SLURM test cluster needs root (CI runs as root) to install and start slurmd")
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    _install_packages()
    _start_munge()
    cluster = SlurmCluster(host=host, cpus=cpus)
    if _node_state(host).rstrip("*") in ("idle", "mixed", "allocated"):
        return cluster  # a running cluster answers: reuse it and leave it running
    _write_conf(host, cpus)
    for daemon, pidfile in (("slurmctld", STATE / "slurmctld.pid"), ("slurmd", STATE / "slurmd.pid")):
        if _daemon_alive(pidfile):
            continue
        # -c: start clean (no jobs from an earlier session); both daemons fork into the background
        args = ("-c",) if daemon == "slurmctld" else ()
        res = _sh(daemon, *args, timeout=60)
        if res.returncode:
            log = STATE / f"{daemon}.log"
            tail = log.read_text()[-800:] if log.exists() else ""
            raise Unavailable(f"{daemon} did not start: {res.stderr.strip()[-400:]} {tail}")
        cluster.started.append(pidfile)
    try:
        wait_for(lambda: _node_state(host).rstrip("*") == "idle", 90, f"sinfo to show node {host} idle")
    except TimeoutError as e:
        stop_cluster(cluster)
        raise Unavailable(f"{e}; node state {_node_state(host)!r}") from None
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Stop the daemons this session started (slurmd first), waiting until they are gone."""
    for pidfile in reversed(cluster.started):
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        try:
            wait_for(lambda p=pidfile: not _daemon_alive(p), 30, f"{pidfile.stem} to exit")
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
    cluster.started.clear()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide single-node SLURM cluster, or a skip that says why it cannot run here."""
    try:
        cluster = start_cluster()
    except Unavailable as e:
        print(f"SKIP: {e}")
        pytest.skip(f"no SLURM test cluster on this machine: {e}")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
