"""Kubernetes pods as the Job controller starts them: the rendered Indexed Job, run pod by pod, killed and restarted.

``largessl launch k8s --out DIR`` renders the manifests an operator applies. This test plays the parts of the
cluster around them, and nothing of the product:

* **the kubelet**: each pod is the container's args run as a process, with exactly the environment the manifest
  gives (:func:`largessl.launch.k8s.pod_environment`: ``JOB_COMPLETION_INDEX`` as the controller sets it from the
  completion-index annotation), in its own UTS namespace whose hostname is ``<job>-<index>`` (as an Indexed Job's
  pod is named), in its own session so a kill reaches every process of the "container". A container killed by a
  signal reports ``128 + signal`` (137 for SIGKILL), as container runtimes do. The ConfigMap and PVC mounts become
  folders (``/etc/largessl``, ``/mnt/runs`` rewritten to ``tmp_path`` in the config and the args).
* **the headless Service's DNS**: ``<job>-<index>.<service>`` (and the ``.<namespace>.svc.cluster.local`` form and
  the bare pod hostname) resolve through lines added to ``/etc/hosts``, one loopback address per pod
  (127.0.1.10 + index), removed at teardown. Nothing overrides ``MASTER_ADDR``: the ranks meet at the name the
  contract derives.
* **the Job controller**: when a pod ends, the Job's own ``podFailurePolicy`` (read from the rendered manifest, rules
  in order, first match wins) decides: ``Ignore`` (not counted), ``FailJob`` (the test fails), or no rule matched
  (counted against the manifest's ``backoffLimit``). A failed index gets a replacement pod at once
  (``restartPolicy: Never``, ``podReplacementPolicy: Failed``: the old pod has terminated); an index that exits 0
  is complete.

Faults land at known steps through the probes of ``tests/run_probes.py`` (``tests/pod_image`` on ``PYTHONPATH``
stands for the image: its ``sitecustomize`` wraps the trainer's stream; the pods' command is unchanged). Each run
checks the exit codes against the policy, that the replacement pods resume from the last complete checkpoint,
that every sample is trained once per epoch (steps lost with a kill excluded: never saved) and that every step is
logged once.

Each run prints its transcript (``-s``), and appends it to the file named by ``LARGESSL_LAUNCH_TRANSCRIPT`` when set.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from run_probes import read_records
from train_procs import logged_steps

from largessl.distributed.env import free_port
from largessl.launch import k8s

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "tests" / "pod_image"
TRANSCRIPT_ENV = "LARGESSL_LAUNCH_TRANSCRIPT"
GLOBAL_BATCH = 32
TIMEOUT_MINUTES = 1.0
EXIT_BOUND_S = TIMEOUT_MINUTES * 60 + min(TIMEOUT_MINUTES * 60, 60)
"""The documented bound for survivors of a dead peer (docs/operations.md)."""
HOSTS = Path("/etc/hosts")
T0 = time.monotonic()


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def _tiny_config(tmp_path: Path, digits: str, num_steps: int, extra: str = "") -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{arch: repro_convnet}}
method: {{projector: "32-32"}}
data: {{augment: small, image_size: 16, num_workers: 0, pin_memory: false, shuffle_buffer: 40,
        train_manifest: {digits}}}
train: {{device: cpu, global_batch_size: {GLOBAL_BATCH}, num_steps: {num_steps}, log_every: 1, collapse_every: 1000,
         run_dir: pods}}
checkpoint: {{every_steps: 4, keep: 20}}
dist: {{timeout_minutes: {TIMEOUT_MINUTES}}}
eval: {{online_probe: false}}
log: {{tensorboard: false, progress: false}}
{extra}
""")
    return cfg


# ---------------------------------------------------------------- the headless Service's DNS (/etc/hosts)


def pod_ip(index: int) -> str:
    return f"127.0.1.{10 + index}"


@contextmanager
def service_dns(job: str, service: str, namespace: str, nodes: int) -> Iterator[None]:
    """``<job>-<i>.<service>`` resolvable for every index while the block runs (lines removed afterwards)."""
    marker = f"# largessl-test-k8s-pods-{os.getpid()}"
    lines = [f"{pod_ip(i)} {job}-{i}.{service}.{namespace}.svc.cluster.local {job}-{i}.{service} {job}-{i} {marker}"
             for i in range(nodes)]

    def rewrite(keep: Callable[[str], bool], add: list[str]) -> None:
        with HOSTS.open("r+") as f:  # in place: /etc/hosts may be a bind mount that cannot be renamed over
            fcntl.flock(f, fcntl.LOCK_EX)
            text = [line for line in f.read().splitlines() if keep(line)] + add
            f.seek(0)
            f.write("\n".join(text) + "\n")
            f.truncate()

    if not os.access(HOSTS, os.W_OK):
        pytest.fail(f"{HOSTS} is not writable: the pod hostnames cannot be resolved (run the tests as root, as CI does)")
    rewrite(lambda line: True, lines)
    try:
        yield
    finally:
        rewrite(lambda line: marker not in line, [])


# ---------------------------------------------------------------- the rendered manifests


@dataclass
class Rendered:
    job: dict
    args: list[str]
    name: str
    service: str
    namespace: str
    run_dir: Path


def render(tmp_path: Path, cfg: Path, nodes: int, procs: int, port: int, strategy_overrides: list[str]) -> Rendered:
    """``largessl launch k8s --out`` as an operator runs it; the mounts become folders under ``tmp_path``."""
    out = tmp_path / "manifests"
    cmd = [sys.executable, "-m", "largessl", "launch", "k8s", "--config", str(cfg), "--nodes", str(nodes),
           "--procs-per-node", str(procs), "--image", "largessl:test", "--pvc", "runs", "--name", "pods",
           "--port", str(port), "--out", str(out), *strategy_overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    docs = list(yaml.safe_load_all((out / "pretrain.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    configmap, svc, job = kinds["ConfigMap"], kinds["Service"], kinds["Job"]
    mounts = {k8s.CONFIG_DIR: tmp_path / "etc", k8s.RUNS_MOUNT: tmp_path / "runs"}

    def local(text: str) -> str:
        for mount, folder in mounts.items():
            text = text.replace(mount, str(folder))
        return text

    (tmp_path / "etc").mkdir()
    (tmp_path / "runs").mkdir()
    for key, text in configmap["data"].items():
        (tmp_path / "etc" / key).write_text(local(text))
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    args = [local(a) for a in pod["containers"][0]["args"]]
    run_dir = Path(local(yaml.safe_load(configmap["data"]["config.yaml"])["train"]["run_dir"]))
    return Rendered(job, args, job["metadata"]["name"], svc["metadata"]["name"], job["metadata"]["namespace"], run_dir)


def policy_action(job: dict, code: int, disruption: bool = False) -> str:
    """What the Job controller does with a pod that failed with ``code``: the manifest's podFailurePolicy rules in
    order, first match wins; no match counts the failure against backoffLimit."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onPodConditions" in rule:
            if disruption and any(c["type"] == "DisruptionTarget" and c.get("status", "True") == "True"
                                  for c in rule["onPodConditions"]):
                return rule["action"]
        else:
            match = rule["onExitCodes"]
            hit = code in match["values"]
            if hit == (match["operator"] == "In"):
                return rule["action"]
    return "Count"


# ---------------------------------------------------------------- the kubelet and the Job controller


@dataclass
class Pod:
    index: int
    attempt: int
    proc: subprocess.Popen
    log: Path
    started: float
    code: int | None = None
    ended: float | None = None

    def container_code(self) -> int | None:
        rc = self.proc.poll()
        if rc is None:
            return None
        return 128 - rc if rc < 0 else rc  # a runtime reports a signalled container as 128 + signal


@dataclass
class Controller:
    """One Indexed Job: starts a pod per index, replaces failed pods, applies the podFailurePolicy."""

    rendered: Rendered
    tmp_path: Path
    env: dict[str, str]
    uts: bool
    pods: dict[int, Pod] = field(default_factory=dict)
    ended: list[Pod] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    counted: int = 0
    ignored: int = 0
    complete: set[int] = field(default_factory=set)

    @property
    def nodes(self) -> int:
        return int(self.rendered.job["spec"]["completions"])

    def start(self, index: int, attempt: int) -> None:
        r = self.rendered
        log = self.tmp_path / f"pod-{index}-attempt-{attempt}.log"
        env = {**self.env, **k8s.pod_environment(r.job, index)}
        hostname = f"{r.name}-{index}"
        cmd = [sys.executable, "-m", "largessl", *r.args]  # the image's entrypoint is `largessl`
        if self.uts:
            cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *cmd]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=self.tmp_path,
                                    start_new_session=True)
        self.pods[index] = Pod(index, attempt, proc, log, time.monotonic())

    def start_all(self) -> None:
        for i in range(self.nodes):
            self.start(i, 0)

    def kill(self, index: int) -> None:
        """The container is killed (node lost, OOM killer, power): every process of the pod, SIGKILL."""
        os.killpg(self.pods[index].proc.pid, signal.SIGKILL)

    def terminate(self, index: int) -> None:
        """``kubectl delete pod``: the kubelet sends SIGTERM to the container's first process."""
        self.pods[index].proc.send_signal(signal.SIGTERM)

    def step(self) -> None:
        """One pass of the controller's loop over the pods."""
        spec = self.rendered.job["spec"]
        for index, pod in list(self.pods.items()):
            code = pod.container_code()
            if code is None:
                continue
            pod.code, pod.ended = code, time.monotonic()
            self.ended.append(pod)
            del self.pods[index]
            if code == 0:
                self.complete.add(index)
                self.events.append(f"pod {index} (attempt {pod.attempt}) succeeded: index {index} complete")
                continue
            action = policy_action(self.rendered.job, code)
            self.events.append(f"pod {index} (attempt {pod.attempt}) failed with exit code {code} after "
                               f"{time.monotonic() - pod.started:.1f} s: podFailurePolicy -> {action}")
            _say(self.events[-1])
            if action == "FailJob":
                raise AssertionError(f"the Job failed: pod {index} exited {code}\n{pod.log.read_text()[-4000:]}")
            if action == "Count":
                self.counted += 1
                if self.counted > spec["backoffLimit"]:
                    raise AssertionError(f"backoffLimit {spec['backoffLimit']} exceeded: {self.events}")
            else:
                self.ignored += 1
            self.start(index, pod.attempt + 1)

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Run the controller's loop until ``done()`` (checked after each pass), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.step()
            if done():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(0.1)

    def finished(self) -> bool:
        return len(self.complete) == self.nodes

    def stop(self) -> None:
        for pod in self.pods.values():
            if pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp_path.glob("pod-*.log")))


def _uts_namespaces() -> bool:
    """Whether ``unshare --uts`` can give each pod its own hostname here (it needs CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        return False
    res = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname largessl-probe && hostname"],
                         capture_output=True, text=True)
    return res.returncode == 0 and res.stdout.strip() == "largessl-probe"


def _records(record: Path, world: int) -> list[dict]:
    return [r for rank in range(world) for r in read_records(record, rank)]


def _gated(rows: list[dict], step: int, world: int) -> bool:
    return len({r["pid"] for r in rows if r["event"] == "gate" and r["step"] == step}) == world


def _complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE.json").exists()


def _resumes(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]


def _transcript(title: str, lines: list[str]) -> None:
    path = os.environ.get(TRANSCRIPT_ENV)
    text = "\n".join([f"## {title}", *lines, ""])
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def _check_samples_once(rows: list[dict], world: int, lost_after: dict[int, int], bpe: int, num_steps: int) -> None:
    """Every sample trained once per epoch. ``lost_after``: pid -> last step of that process that was saved (its
    later batches were trained, then lost with a kill, and trained again after the resume)."""
    batches = [r for r in rows if r["event"] == "batch"]
    kept = [b for b in batches if b["step"] <= lost_after.get(b["pid"], num_steps)]
    assert {b["world"] for b in batches} == {world}
    for epoch in range(num_steps // bpe + 1):
        count = min(bpe, num_steps - epoch * bpe)
        per_batch: dict[int, list[str]] = {}
        for b in kept:
            if b["epoch"] == epoch:
                per_batch.setdefault(b["batch"], []).extend(b["keys"])
        assert sorted(per_batch) == list(range(count)), (epoch, sorted(per_batch))
        assert all(len(keys) == GLOBAL_BATCH for keys in per_batch.values())
        keys = [k for ks in per_batch.values() for k in ks]
        assert len(keys) == len(set(keys)) == count * GLOBAL_BATCH


def _pids_by_attempt(rows: list[dict]) -> dict[int, set[int]]:
    """Attempt number -> the pids that trained in it (a pod's ranks share its attempt; read from the records,
    as the ranks of a node-launcher pod are its children)."""
    out: dict[int, set[int]] = {}
    first_step: dict[int, int] = {}
    for r in rows:
        if r["event"] == "batch":
            first_step.setdefault(r["pid"], r["step"])
    resumed = sorted(set(first_step.values()))
    for pid, step in first_step.items():
        out.setdefault(resumed.index(step), set()).add(pid)
    return out


@pytest.mark.parametrize("strategy,nodes,procs", [("ddp", 2, 2), ("deepspeed", 2, 1)],
                         ids=["ddp-2pods-x2-node-launcher", "deepspeed-zero2-2pods-x1"])
def test_indexed_job_pods_survive_a_kill_and_a_deletion(digits: str, tmp_path: Path, strategy: str, nodes: int,
                                                         procs: int) -> None:
    """Fault 1: a pod is SIGKILLed right after the checkpoint at step 4 (pod 1 for DDP; for DeepSpeed pod 0, the
    rendezvous host). The killed pod reports 137 and its peers 3: both are counted against backoffLimit (no rule
    matches), their replacements resume at step 4. Fault 2: pod 0 is deleted (SIGTERM to its first process) before
    step 13: every rank agrees to stop, saves at the next step boundary and exits 75, which the policy ignores;
    the replacements resume there and finish."""
    from largessl.data.manifest import read_manifest

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    world = nodes * procs
    bpe = read_manifest(digits).num_samples // GLOBAL_BATCH
    num_steps = bpe + 4  # the last leg crosses into epoch 1
    killed_at, deleted_at = 4, 12  # checkpoints every 4 steps
    victim = 1 if strategy == "ddp" else 0
    strategy_overrides = ["dist.strategy=deepspeed", "dist.zero_stage=2"] if strategy == "deepspeed" else []
    cfg = _tiny_config(tmp_path, digits, num_steps)
    port = free_port()
    rendered = render(tmp_path, cfg, nodes, procs, port, strategy_overrides)
    assert rendered.args[:1] == (["pretrain"] if procs == 1 else ["launch"]), rendered.args
    record = tmp_path / "record"
    gate_kill, gate_delete = tmp_path / "gate-kill", tmp_path / "gate-delete"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(IMAGE), "LARGESSL_TEST_RECORD_DIR": str(record),
           "LARGESSL_TEST_GATES": f"{killed_at + 1}:{gate_kill},{deleted_at + 1}:{gate_delete}"}
    uts = _uts_namespaces()
    _say(f"{strategy}: Indexed Job {rendered.name}, {nodes} pods x {procs} process(es), rendezvous at "
         f"{rendered.name}-0.{rendered.service}:{port}; pod hostnames "
         + ("set in UTS namespaces" if uts else "NOT set (unshare --uts unavailable here; /etc/hosts names only)"))
    ctl = Controller(rendered, tmp_path, env, uts)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    with service_dns(rendered.name, rendered.service, rendered.namespace, nodes):
        try:
            ctl.start_all()
            ctl.run_until(lambda: _gated(_records(record, world), killed_at + 1, world)
                          and _complete(rendered.run_dir, killed_at), 400, f"{world} ranks past step {killed_at}")
            first = dict(ctl.pods)
            ctl.kill(victim)
            gate_kill.touch()
            t_kill = time.monotonic()
            _say(f"fault 1: pod {victim} SIGKILLed after the checkpoint at step {killed_at}")
            ctl.run_until(lambda: all(p.ended is not None for p in first.values()), EXIT_BOUND_S + 120,
                          "the first pods to end")
            times["peers exited after (s)"] = max(p.ended for i, p in first.items() if i != victim) - t_kill
            ctl.run_until(lambda: _gated(_records(record, world), deleted_at + 1, world), 400,
                          f"the replacement pods at step {deleted_at}")
            ctl.terminate(0)
            gate_delete.touch()
            t_delete = time.monotonic()
            _say(f"fault 2: pod 0 deleted (SIGTERM) before step {deleted_at + 1}")
            ctl.run_until(ctl.finished, 600, "the Job to complete")
            times["deleted -> complete (s)"] = time.monotonic() - t_delete
        finally:
            ctl.stop()
            gate_kill.touch()
            gate_delete.touch()
    times["total (s)"] = time.monotonic() - t0
    logs = ctl.logs()
    by_attempt: dict[int, list[Pod]] = {}
    for pod in ctl.ended:
        by_attempt.setdefault(pod.attempt, []).append(pod)
    codes = {a: {p.index: p.code for p in pods} for a, pods in sorted(by_attempt.items())}

    # fault 1: the killed container 137, its peers 3 (a dead peer), all counted; they stop within the bound
    assert codes[0][victim] == 137, (codes, logs)
    assert all(c == 3 for i, c in codes[0].items() if i != victim), (codes, logs)
    assert policy_action(rendered.job, 137) == policy_action(rendered.job, 3) == "Count"
    # fault 2: every pod of the second attempt saved and exited 75, ignored by the policy
    assert codes[1] == dict.fromkeys(range(nodes), 75), (codes, logs)
    assert policy_action(rendered.job, 75) == "Ignore"
    assert codes[2] == dict.fromkeys(range(nodes), 0), (codes, logs)
    assert (ctl.counted, ctl.ignored) == (nodes, nodes)
    # the lost pod cost every pod a counted failure: one of the job's 6 (--backoff-limit) whatever its size
    assert rendered.job["spec"]["backoffLimit"] == 6 * nodes

    text = "".join(p.log.read_text() for p in ctl.ended)
    second_log = "".join(p.log.read_text() for p in by_attempt[1])
    third_log = "".join(p.log.read_text() for p in by_attempt[2])
    source = "k8s" if procs == 1 else "torchrun"
    assert f"rank 0 of {world} ({source})" in text, logs
    assert set(_resumes(second_log)) == {killed_at}, second_log[-3000:]
    saved_on_stop = _resumes(third_log)
    assert len(set(saved_on_stop)) == 1 and saved_on_stop[0] > deleted_at, third_log[-3000:]
    assert [r["step"] for r in logged_steps(rendered.run_dir)] == list(range(1, num_steps + 1))
    assert (rendered.run_dir / "pretrain-complete.json").exists()

    rows = _records(record, world)
    attempts = _pids_by_attempt(rows)
    assert sorted(attempts) == [0, 1, 2] and all(len(p) == world for p in attempts.values()), attempts
    lost_after = dict.fromkeys(attempts[0], killed_at) | dict.fromkeys(attempts[1], saved_on_stop[0])
    _check_samples_once(rows, world, lost_after, bpe, num_steps)
    lost = sorted({r["step"] for r in rows if r["event"] == "batch" and r["pid"] in attempts[0]
                   and r["step"] > killed_at})

    _transcript(f"Kubernetes Indexed Job, {strategy}: {nodes} pods x {procs} process(es) (world {world}), "
                f"rendezvous at {rendered.name}-0.{rendered.service}:{port}", [
        *(f"  {e}" for e in ctl.events),
        f"podFailurePolicy: {ctl.counted} failures counted against backoffLimit "
        f"{rendered.job['spec']['backoffLimit']}, {ctl.ignored} ignored",
        f"attempt 1 resumed at step {killed_at}; attempt 2 resumed at step {saved_on_stop[0]} (saved on SIGTERM)",
        f"lost with the kill and trained again: steps {lost or 'none'}; each sample once per epoch; steps 1..{num_steps}"
        " logged once",
        "times: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())])
