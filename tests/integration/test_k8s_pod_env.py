"""The Kubernetes pod contract, run for real: N local processes, each with exactly the environment and the
container args the rendered Indexed Job gives its pod, form the process group and train a few steps.

Two substitutions stand in for the cluster: node 0's DNS name ``<job>-0.<service>`` becomes 127.0.0.1
(set as MASTER_ADDR, which the contract lets override the derived name) with a free port instead of 29500
(other tests may hold it), and the pod's volume mounts (ConfigMap at /etc/largessl, PVC at /mnt/runs)
become folders under tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largessl.distributed.env import free_port
from largessl.launch import k8s

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_STEPS = 3


def _tiny_config(tmp_path: Path) -> Path:
    from largessl.data.digits import write_digits_shards

    train, val = write_digits_shards(str(tmp_path / "data"), image_size=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{arch: resnet18, small_input: true}}
data: {{image_size: 32, num_workers: 0, train_manifest: {train}, val_manifest: {val}}}
method: {{projector: "64-64"}}
train: {{global_batch_size: 16, num_steps: {NUM_STEPS}, log_every: 1, device: cpu, run_dir: tiny}}
checkpoint: {{every_steps: 2}}
log: {{tensorboard: false, progress: false}}
""")
    return cfg


@pytest.mark.parametrize("nodes,procs", [(2, 1), (1, 2)], ids=["2pods-x1-direct", "1pod-x2-node-launcher"])
def test_pods_form_the_group_and_train(tmp_path: Path, nodes: int, procs: int) -> None:
    plan = k8s.plan_manifests(k8s.K8sRequest(config=[str(_tiny_config(tmp_path))], nodes=nodes,
                                             procs_per_node=procs, image="largessl:test", pvc="runs"))
    configmap, job = plan.pretrain[0], plan.pretrain[2]
    mounts = {k8s.CONFIG_DIR: str(tmp_path / "etc"), k8s.RUNS_MOUNT: str(tmp_path / "runs")}

    def local(text: str) -> str:
        for mount, folder in mounts.items():
            text = text.replace(mount, folder)
        return text

    (tmp_path / "etc").mkdir()
    for name, text in configmap["data"].items():
        (tmp_path / "etc" / name).write_text(local(text))
    args = [local(a) for a in job["spec"]["template"]["spec"]["containers"][0]["args"]]
    port = str(free_port())
    procs_ = []
    for index in range(nodes):
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
               **k8s.pod_environment(job, index), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = open(tmp_path / f"pod-{index}.log", "w")  # noqa: SIM115 (closed below)
        # the image's entrypoint is `largessl`; the manifest gives its args
        procs_.append((subprocess.Popen([sys.executable, "-m", "largessl", *args], env=env, stdout=log,
                                        stderr=subprocess.STDOUT), log))
    codes = []
    for p, log in procs_:
        try:
            codes.append(p.wait(timeout=480))
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {i: (tmp_path / f"pod-{i}.log").read_text() for i in range(nodes)}
    assert codes == [0] * nodes, logs
    source = "k8s" if procs == 1 else "torchrun"  # direct pod contract vs `largessl launch node`'s ranks
    assert f"rank 0 of {nodes * procs} ({source})" in logs[0], logs[0][-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, NUM_STEPS + 1))
