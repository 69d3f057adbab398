"""``largessl pretrain`` under real torchrun agents: two agents of a static 2-node job, then an elastic job that
loses a node and gets it back.

Each torchrun agent stands for one node (both on this machine, rendezvous on 127.0.0.1). The static job is the
product command as an operator would type it, ``torchrun --nnodes 2 --node-rank N ... -m largessl pretrain``. The
elastic job (``--rdzv-backend c10d --nnodes 1:2``) runs ``tests/recorded_pretrain.py``, which is the same CLI
with the probes of :mod:`run_probes`: every rank records the sample keys of each batch it is handed and the
world it trained in, and waits at two gates so that the faults land at known steps:

1. world 4 (two agents x 2 ranks) trains to the gate before step 9 (checkpoint at step 8); node 2 is lost:
   its agent and its worker processes are SIGKILLed (torchrun starts workers in their own sessions, so
   killing the agent's process group alone would leave them training);
2. node 1's ranks then fail on the dead peers (exit 3), its agent restarts them and the next rendezvous round
   closes with node 1 alone: world 2 resumes from step 8, re-splitting the epoch's unread samples;
3. node 2's agent is started again: node 1's agent sees a node waiting and restarts its workers with
   SIGTERM, which they answer by saving at the next step boundary (step 21) and exiting 75; world 4 resumes
   at step 21 and trains to the end, where both agents exit 0.

Within each epoch every sample is trained on exactly once (the steps lost with node 2 are not counted:
they were never saved), and the steps and their log records continue without a gap or a repeat.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_procs import logged_steps

from largessl.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[2]
TRANSCRIPT_ENV = "LARGESSL_LAUNCH_TRANSCRIPT"
"""When set, each test appends its key output (exit codes, world-size legs, resume steps, times) to this file."""

GLOBAL_BATCH = 32

TINY = ["model.arch=repro_convnet", "method.projector=32-32", "data.augment=small", "data.image_size=16",
        "data.num_workers=0", "data.pin_memory=false", "data.shuffle_buffer=40", "train.device=cpu",
        f"train.global_batch_size={GLOBAL_BATCH}", "train.log_every=1", "train.collapse_every=1000",
        "log.progress=false", "log.tensorboard=false", "eval.online_probe=false", "dist.timeout_minutes=1"]


def _torchrun() -> list[str]:
    """The venv's ``torchrun`` (the console script of ``torch.distributed.run``)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("TORCHELASTIC_", "JOB_COMPLETION_INDEX", "LARGESSL_WORLD_SIZE", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def _start_agent(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    out = open(log, "a")  # noqa: SIM115 (the child holds it; closed with the test's tmp_path)
    out.write(f"$ torchrun {' '.join(args)}\n")
    out.flush()
    return subprocess.Popen([*_torchrun(), *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def _kill_node(agent: subprocess.Popen) -> list[int]:
    """SIGKILL the agent and every process it started (its workers run in sessions of their own): a lost node."""
    try:
        procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    agent.wait(timeout=30)
    return [p.pid for p in procs]


def _stop(agents: list[subprocess.Popen]) -> None:
    """Teardown: no agent or worker of this test outlives it."""
    for a in agents:
        if a.poll() is None:
            _kill_node(a)


def _wait(agents: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for a in agents:
        try:
            a.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return [a.poll() for a in agents]


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("agent*.log")))


def _records(record_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(record_dir.glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by the SIGKILL
                pass
    return rows


def _transcript(title: str, lines: list[str]) -> None:
    text = "\n".join([f"### {title}", *lines, ""]) + "\n"
    print(text)
    path = os.environ.get(TRANSCRIPT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(text)


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_static_two_agents_train_at_world_4(digits: str, tmp_path: Path) -> None:
    num_steps = 4
    run = tmp_path / "run"
    port = str(free_port())
    overrides = [*TINY, f"data.train_manifest={digits}", f"train.num_steps={num_steps}", "checkpoint.every_steps=2",
                 f"train.run_dir={run}"]
    t0 = time.monotonic()
    agents = [_start_agent(["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "2", "--master-addr",
                            "127.0.0.1", "--master-port", port, "-m", "largessl", "pretrain", *overrides],
                           tmp_path / f"agent{n}.log", _agent_env()) for n in (0, 1)]
    try:
        codes = _wait(agents, timeout=400)
    finally:
        _stop(agents)
    logs = _logs(tmp_path)
    assert codes == [0, 0], logs
    assert "rank 0 of 4 (torchrun)" in logs and "plan: 4 rank(s) x 8 = global batch 32" in logs, logs
    assert [r["step"] for r in logged_steps(run)] == list(range(1, num_steps + 1))
    assert (run / "pretrain-complete.json").exists()
    _transcript("torchrun static: --nnodes 2 --node-rank {0,1} --nproc-per-node 2 -m largessl pretrain", [
        f"agent exit codes (node 0, node 1): {codes}",
        "world size: 4 (log: 'rank 0 of 4 (torchrun)', 'plan: 4 rank(s) x 8 = global batch 32')",
        f"steps logged: 1..{num_steps}; pretrain-complete.json written; {time.monotonic() - t0:.0f} s"])


def _wait_records(record_dir: Path, agents: list[subprocess.Popen], what: str, ok, timeout: float = 300) -> None:
    """Block until ``ok(records)`` (fails if an agent exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok(_records(record_dir)):
            return
        if any(a.poll() is not None for a in agents):
            raise AssertionError(f"waiting for {what}: an agent exited with {[a.poll() for a in agents]}")
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout} s")


def _gated(rows: list[dict], step: int, world: int) -> bool:
    """Every rank of a ``world``-rank attempt waits at the gate before ``step``."""
    return len({r["pid"] for r in rows if r["event"] == "gate" and r["step"] == step and r["world"] == world}) == world


@pytest.mark.slow  # > 20 s on 2 cores: CI runs it (make test-slow), make test does not
def test_elastic_loses_a_node_resumes_at_world_2_and_grows_back_to_4(digits: str, tmp_path: Path) -> None:
    from largessl.data.manifest import read_manifest

    bpe = read_manifest(digits).num_samples // GLOBAL_BATCH  # 44 batches per epoch for the 1,438 training digits
    num_steps = bpe + 4  # the last leg crosses into epoch 1
    lost_at, rejoin_at = 8, 20  # checkpoints every 4 steps: the node is lost right after the save at step 8
    run, record = tmp_path / "run", tmp_path / "record"
    gate_lost, gate_rejoin = tmp_path / "gate-lost", tmp_path / "gate-rejoin"
    # torch 2.14's c10d agents share one TCPStore with their workers across rounds by default: the restarted
    # workers then read the previous round's gloo addresses (connectFullMesh: connection refused, torch's own
    # env:// init included), and a rank-0 agent that already serves the store does not publish it to a node
    # that joins later (the new agent waits for MASTER_ADDR until it times out). One store per round avoids both.
    env = _agent_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LARGESSL_TEST_RECORD_DIR=str(record),
                     LARGESSL_TEST_GATES=f"{lost_at + 1}:{gate_lost},{rejoin_at + 1}:{gate_rejoin}")
    port = free_port()
    overrides = [*TINY, f"data.train_manifest={digits}", f"train.num_steps={num_steps}", "checkpoint.every_steps=4",
                 "checkpoint.keep=20", f"train.run_dir={run}"]

    def agent(node: int, log: str) -> subprocess.Popen:
        # node 1 hosts the c10d rendezvous store (is_host), so losing node 2 loses no rendezvous state;
        # last_call_timeout: how long a round with fewer than 2 nodes waits for more before it closes
        return _start_agent(["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
                             "--rdzv-conf", f"is_host={int(node == 1)},last_call_timeout=10", "--max-restarts", "3",
                             "--monitor-interval", "0.5", str(ROOT / "tests" / "recorded_pretrain.py"), *overrides],
                            tmp_path / log, env)

    t0 = time.monotonic()
    times: dict[str, float] = {}
    node1, node2 = agent(1, "agent-node1.log"), agent(2, "agent-node2.log")
    agents = [node1, node2]
    try:
        _wait_records(record, agents, f"4 ranks at the gate before step {lost_at + 1}",
                      lambda rows: _gated(rows, lost_at + 1, 4))
        times["world 4 at step 8"] = time.monotonic() - t0
        killed = _kill_node(node2)
        times["node 2 lost"] = time.monotonic() - t0
        gate_lost.touch()  # node 1's ranks go on into step 9 and meet the dead peers
        _wait_records(record, [node1], f"2 ranks at the gate before step {rejoin_at + 1}",
                      lambda rows: _gated(rows, rejoin_at + 1, 2))
        times["world 2 at step 20"] = time.monotonic() - t0
        node2 = agent(2, "agent-node2-rejoined.log")
        agents = [node1, node2]
        times["node 2 restarted"] = time.monotonic() - t0
        world2 = {r["pid"] for r in _records(record) if r["event"] == "gate" and r["world"] == 2}
        # node 1's agent restarts its workers for the new member with SIGTERM; let them take step 21 only then
        _wait_records(record, agents, "SIGTERM delivered to the world-2 ranks", lambda rows: {
            r["pid"] for r in rows if r["event"] == "signal" and r["signal"] == "SIGTERM"} >= world2)
        times["SIGTERM to world-2 ranks"] = time.monotonic() - t0
        gate_rejoin.touch()
        codes = _wait(agents, timeout=400)
        times["both agents exited"] = time.monotonic() - t0
    finally:
        _stop(agents)
        gate_lost.touch()
        gate_rejoin.touch()
    logs = _logs(tmp_path)
    assert codes == [0, 0], logs

    rows = _records(record)
    batches = [r for r in rows if r["event"] == "batch"]
    # one leg per rendezvous round: its processes, its world, the step it resumed at (its first batch - 1)
    first: dict[int, dict] = {}
    for b in batches:
        first.setdefault(b["pid"], b)
    legs: list[dict] = []
    for pid, b in sorted(first.items(), key=lambda kv: kv[1]["step"]):
        if not legs or legs[-1]["resumed_at"] != b["step"] - 1:
            legs.append({"world": b["world"], "resumed_at": b["step"] - 1, "pids": set()})
        assert legs[-1]["world"] == b["world"], legs
        legs[-1]["pids"].add(pid)
    assert [(leg["world"], leg["resumed_at"]) for leg in legs] == [(4, 0), (2, lost_at), (4, rejoin_at + 1)], legs
    assert [len(leg["pids"]) for leg in legs] == [4, 2, 4]
    exits = {r["pid"]: r["code"] for r in rows if r["event"] == "exit"}
    # node 1's ranks of the first leg failed on the dead peers (3: a lost peer is an environment error); the
    # world-2 ranks saved on SIGTERM (75); the last leg finished (0). Node 2's first ranks were SIGKILLed.
    assert {exits.get(p) for p in legs[0]["pids"] if p not in killed} <= {3, None}, (exits, logs)
    assert [exits.get(p) for p in legs[1]["pids"]] == [75, 75], (exits, logs)
    assert [exits.get(p) for p in legs[2]["pids"]] == [0] * 4, (exits, logs)
    assert not [p for p in legs[0]["pids"] if p in killed and p in exits]

    # exactly once per epoch: the batches each leg trained and saved (a leg's batches after the step the next leg
    # resumed at were never saved: node 1's step 9 of the first leg)
    ends = [leg["resumed_at"] for leg in legs[1:]] + [num_steps]
    kept = [b for b in batches for leg, end in zip(legs, ends) if b["pid"] in leg["pids"] and b["step"] <= end]
    lost = [b for b in batches if b not in kept]
    assert lost and {(b["step"], b["pid"] in legs[0]["pids"]) for b in lost} == {(lost_at + 1, True)}, lost
    for epoch, count in ((0, bpe), (1, num_steps - bpe)):
        per_batch: dict[int, list[str]] = {}
        for b in kept:
            if b["epoch"] == epoch:
                per_batch.setdefault(b["batch"], []).extend(b["keys"])
        assert sorted(per_batch) == list(range(count))
        assert all(len(k) == GLOBAL_BATCH for k in per_batch.values())
        keys = [k for ks in per_batch.values() for k in ks]
        assert len(keys) == len(set(keys)) == count * GLOBAL_BATCH
    assert [r["step"] for r in logged_steps(run)] == list(range(1, num_steps + 1))
    full = "".join(p.read_text() for p in tmp_path.glob("agent*.log"))
    assert full.count("data re-split on resume (world_size 4 → 2)") == 2, logs
    assert full.count("data re-split on resume (world_size 2 → 4)") == 4, logs
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert f"step-{lost_at:08d}" in saved and f"step-{rejoin_at + 1:08d}" in saved, saved

    _transcript("torchrun elastic: --rdzv-backend c10d --nnodes 1:2 --nproc-per-node 2, node 2 lost and restarted", [
        "legs (world size, resumed at step, exit codes of its ranks):",
        *[f"  leg {i + 1}: world {leg['world']}, resumed at step {leg['resumed_at']}, exit codes "
          f"{sorted((exits.get(p, 'SIGKILL') for p in leg['pids']), key=str)}" for i, leg in enumerate(legs)],
        f"agent exit codes (node 1, node 2 rejoined): {codes}; node 2's first agent: SIGKILL (with its workers)",
        f"epoch 0: {bpe} batches x {GLOBAL_BATCH} samples, each key once; epoch 1: {num_steps - bpe} batches, "
        f"each key once; lost with node 2: step {lost_at + 1} (never saved, retrained in leg 2)",
        f"steps logged: 1..{num_steps} each once; checkpoints: {', '.join(saved)}",
        "times (s since start): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())])
