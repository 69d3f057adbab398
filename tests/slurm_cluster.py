"""A real SLURM cluster for the integration tests: munge, slurmctld and three slurmd daemons on this host.

Partition ``debug`` (the default) is one node named after this host; partition ``pair`` is two nodes, ``n1``
and ``n2``, each its own ``slurmd -N <name>`` with its own port (Debian's slurm-wlm runs several slurmd per host
given distinct ``Port=`` and ``%n`` in the spool, pid and log paths), both reached at 127.0.0.1. A two-node job
gets ``SLURM_JOB_NODELIST=n[1-2]``, so the ranks meet at ``n1``, which ``/etc/hosts`` maps to 127.0.0.1.

Needs root and apt (CI runs as root on a fresh Debian/Ubuntu machine): missing packages are installed
with apt-get, a minimal ``slurm.conf`` is written, ``n1``/``n2`` are added to ``/etc/hosts``, the daemons are
started and the fixture waits until ``sinfo`` shows every node idle. A cluster that already answers is reused
and left running; a cluster this module started is stopped at session end and ``/etc/slurm/slurm.conf`` and
``/etc/hosts`` get back their earlier contents. Where any of this is impossible the fixture skips with the
reason.
"""

from __future__ import annotations

import contextlib
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
PAIR_PARTITION = "pair"
PAIR_NODES = ("n1", "n2")
PAIR_PORTS = (6819, 6820)
"""slurmd ports of ``n1``/``n2`` (the host's node keeps SLURM's default, 6818)."""
HOSTS = Path("/etc/hosts")
HOSTS_LINE = "127.0.0.1 " + " ".join(PAIR_NODES) + "  # written by largessl tests/slurm_cluster.py"
PACKAGES = ("slurm-wlm", "munge")


class Unavailable(Exception):
    """This machine cannot host the test cluster (the message says why)."""


@dataclass
class SlurmCluster:
    """Handle on the running test cluster."""

    host: str
    cpus: int
    partition: str = PARTITION
    pair_partition: str = PAIR_PARTITION
    """The two-node partition (nodes :data:`PAIR_NODES`)."""
    started: list[Path] = field(default_factory=list)
    """Pid files of the daemons this session started (and must stop)."""
    restore: dict[Path, bytes | None] = field(default_factory=dict)
    """Files under /etc this session changed, with their earlier contents (None: did not exist)."""
    munged_pid: int | None = None
    """munged, when this session started it."""

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

    def node_state(self, node: str) -> str:
        """The node's state as ``sinfo`` prints it (``idle``, ``allocated``, ``down*``, ...)."""
        return _node_state(node)

    def task_pids(self, job_id: str, node: str) -> dict[int, int]:
        """``{pid: SLURM_PROCID}`` of job ``job_id``'s step tasks running on ``node`` (children of slurmstepd)."""
        return {pid: int(env["SLURM_PROCID"]) for pid, env in _process_envs()
                if env.get("SLURM_JOB_ID") == job_id and env.get("SLURMD_NODENAME") == node
                and "SLURM_STEP_ID" in env and env.get("SLURM_PROCID", "").isdigit()
                and _cmdline(_ppid(pid) or 0).startswith("slurmstepd")}

    def kill_node(self, node: str) -> list[int]:
        """Fail ``node`` like a machine losing power: SIGKILL its slurmd, the slurmstepd daemons of its job steps
        and every task process on it (found by ``SLURMD_NODENAME`` in their environment). Returns the pids."""
        tasks = [pid for pid, env in _process_envs() if env.get("SLURMD_NODENAME") == node]
        stepds = {ppid for ppid in map(_ppid, tasks) if ppid and _cmdline(ppid).startswith("slurmstepd")}
        pids = [_pid(_slurmd_pidfile(node)), *sorted(stepds), *tasks]
        killed = []
        for pid in pids:
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        return killed

    def start_node(self, node: str, timeout: float = 120) -> None:
        """Start ``node``'s slurmd again (after :meth:`kill_node`) and wait until SLURM uses it again."""
        pidfile = _slurmd_pidfile(node)
        if not _daemon_alive(pidfile):
            _start_daemon("slurmd", "-N", node)
            if pidfile not in self.started:
                self.started.insert(1, pidfile)
        # ReturnToService=2: a DOWN node comes back as soon as its slurmd registers
        wait_for(lambda: self.node_state(node).rstrip("*") in ("idle", "mixed", "allocated"), timeout,
                 f"node {node} to return to service")


def _process_envs() -> Iterator[tuple[int, dict[str, str]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        yield int(entry.name), env


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


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


def _start_munge() -> int | None:
    """Start munged unless munge already works; returns the pid of the munged this call started."""
    if _munge_works():
        return None
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
    return _pid(Path("/run/munge/munged.pid"))


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _slurmd_pidfile(node: str) -> Path:
    return STATE / f"slurmd-{node}.pid"


def _conf_text(host: str, cpus: int) -> str:
    # Leave headroom: slurmd refuses a node whose RealMemory exceeds what it measures.
    mem = max(256, int(_mem_mb() * 0.8))
    pair = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                     f"RealMemory={mem} State=UNKNOWN" for node, port in zip(PAIR_NODES, PAIR_PORTS))
    return f"""{MARKER}
ClusterName=largessl
SlurmctldHost={host}(127.0.0.1)
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
# %n: one spool folder, pid file and log per slurmd (three run on this host)
SlurmdSpoolDir={STATE / "d" / "%n"}
SlurmctldPidFile={STATE / "slurmctld.pid"}
SlurmdPidFile={STATE / "slurmd-%n.pid"}
SlurmctldLogFile={STATE / "slurmctld.log"}
SlurmdLogFile={STATE / "slurmd-%n.log"}
SlurmctldPort=6817
SlurmdPort=6818
# a node whose slurmd stops answering is DOWN (and its requeueable jobs requeued) after this many seconds
SlurmdTimeout=10
# jobs stay visible to scontrol long after they end (there is no accounting database to ask)
MinJobAge=3600
# time between SIGTERM and SIGKILL on requeue/cancel: the trainer's final checkpoint fits in it
KillWait=60
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
{pair}
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName={PAIR_PARTITION} Nodes={",".join(PAIR_NODES)} MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _remember(cluster: SlurmCluster, path: Path) -> None:
    if path not in cluster.restore:
        cluster.restore[path] = path.read_bytes() if path.exists() else None


def _write_etc(cluster: SlurmCluster) -> None:
    """slurm.conf and the /etc/hosts line for n1/n2; the earlier contents are kept in ``cluster.restore``."""
    for node in PAIR_NODES:
        (STATE / "d" / node).mkdir(parents=True, exist_ok=True)
    (STATE / "d" / cluster.host).mkdir(parents=True, exist_ok=True)
    (STATE / "ctld").mkdir(parents=True, exist_ok=True)
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    if CONF.exists() and MARKER not in CONF.read_text():
        raise Unavailable(f"{CONF} exists and was not written by the tests; refusing to overwrite it")
    _remember(cluster, CONF)
    CONF.write_text(_conf_text(cluster.host, cluster.cpus))
    hosts = HOSTS.read_text() if HOSTS.exists() else ""
    if HOSTS_LINE not in hosts.splitlines():
        _remember(cluster, HOSTS)
        HOSTS.write_text(hosts + ("" if hosts.endswith("\n") or not hosts else "\n") + HOSTS_LINE + "\n")


def _node_state(host: str) -> str:
    res = _sh("sinfo", "-h", "-N", "-n", host, "-o", "%T", timeout=15)
    return res.stdout.strip().lower() if res.returncode == 0 else ""


def _daemon_alive(pidfile: Path) -> bool:
    pid = _pid(pidfile)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _start_daemon(daemon: str, *args: str) -> None:
    # both daemons fork into the background and write their pid files
    res = _sh(daemon, *args, timeout=60)
    if res.returncode:
        logs = sorted(STATE.glob(f"{daemon}*.log"))
        tail = " ".join(p.read_text()[-400:] for p in logs)
        raise Unavailable(f"{daemon} {' '.join(args)} did not start: {res.stderr.strip()[-400:]} {tail}")


def _stop(pidfile: Path) -> None:
    pid = _pid(pidfile)
    if pid is None or not _daemon_alive(pidfile):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not _daemon_alive(pidfile), 30, f"{pidfile.stem} to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def _all_idle(nodes: tuple[str, ...]) -> bool:
    return all(_node_state(n).rstrip("*") in ("idle", "mixed", "allocated") for n in nodes)


def start_cluster() -> SlurmCluster:
    """Bring up (or reuse) the cluster; raises :class:`Unavailable` where it cannot run."""
    if os.name != "posix" or os.geteuid() != 0:
        raise Unavailable("the SLURM test cluster needs root (CI runs as root) to install and start slurmd")
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    _install_packages()
    cluster = SlurmCluster(host=host, cpus=cpus)
    cluster.munged_pid = _start_munge()
    nodes = (host, *PAIR_NODES)
    if _all_idle(nodes):
        return cluster  # a running cluster answers: reuse it and leave it running
    # daemons of an earlier layout of this cluster (one slurmd, or a stale slurmctld) would hold the ports
    for stale in (STATE / "slurmd.pid", *(_slurmd_pidfile(n) for n in nodes), STATE / "slurmctld.pid"):
        _stop(stale)
    try:
        _write_etc(cluster)
        # -c: start clean (no jobs from an earlier session)
        _start_daemon("slurmctld", "-c")
        cluster.started.append(STATE / "slurmctld.pid")
        for node in nodes:
            _start_daemon("slurmd", "-N", node)
            cluster.started.append(_slurmd_pidfile(node))
        wait_for(lambda: _all_idle(nodes), 90, f"sinfo to show nodes {', '.join(nodes)} idle")
    except (Unavailable, TimeoutError) as e:
        states = {n: _node_state(n) for n in nodes}
        stop_cluster(cluster)
        raise Unavailable(f"{e}; node states {states}") from None
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Stop the daemons this session started (slurmd first), then give /etc back its earlier files."""
    for pidfile in reversed(cluster.started):
        _stop(pidfile)
    cluster.started.clear()
    if cluster.munged_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(cluster.munged_pid, signal.SIGTERM)
        cluster.munged_pid = None
    for path, content in cluster.restore.items():
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
    cluster.restore.clear()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide SLURM cluster (one-node partition ``debug``, two-node ``pair``), or a skip that says why."""
    try:
        cluster = start_cluster()
    except Unavailable as e:
        print(f"SKIP: {e}")
        pytest.skip(f"no SLURM test cluster on this machine: {e}")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
