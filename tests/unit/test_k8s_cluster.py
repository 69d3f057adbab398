"""Kubernetes for a real cluster: stage Jobs gated in the cluster on the pretraining's completion marker (its init
command run for real against an empty and a completed run directory), default requests and limits, scheduling
flags, the Kueue and InfiniBand overlays (equal to the renderer's flags), a data volume, strict validation."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from synthetic_stream import SyntheticStream

from largessl.config import load_config
from largessl.distributed.env import DistEnv
from largessl.launch import k8s
from largessl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ("1.30.0", "1.33.0")


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text("train: {run_dir: bt, num_steps: 100}\nstages: [linear, knn]\n"
                 "data: {train_manifest: s3://bucket/in1k/train/manifest.json, "
                 "val_manifest: s3://bucket/in1k/val/manifest.json}\n")
    return p


def _plan(cfg_file: Path, **kw: Any) -> k8s.K8sPlan:
    # offline: the s3:// manifests are not reachable here (test_submit_checks.py runs the checks on real data)
    kw.setdefault("pvc", "runs")
    return k8s.plan_manifests(k8s.K8sRequest(config=[str(cfg_file)], nodes=kw.pop("nodes", 4),
                                             image="reg.example/largessl:0.1", offline=True, **kw))


def _jobs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == "Job"]


def _init_command(job: dict[str, Any], runs: Path) -> list[str]:
    """The stage Job's init container as this machine runs it: the image's entrypoint is `largessl`, and the PVC
    mounted at /mnt/runs is a local folder."""
    init = job["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == [k8s.GATE_CONTAINER]
    args = [a.replace(k8s.RUNS_MOUNT, str(runs)) for a in init[0]["args"]]
    return [sys.executable, "-m", "largessl", *args]


def test_a_stage_job_cannot_start_before_pretraining_completed(cfg_file: Path, tmp_path: Path) -> None:
    plan = _plan(cfg_file, gpus_per_node=8)
    assert "initContainers" not in plan.pretrain[2]["spec"]["template"]["spec"]
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for job in _jobs(plan.stages):
        pod = job["spec"]["template"]["spec"]
        # Kubernetes runs every init container to success before any container of the pod starts
        assert pod["containers"][0]["args"][5:7] in (["eval", "linear"], ["eval", "knn"])
        assert {"name": "runs", "mountPath": k8s.RUNS_MOUNT} in pod["initContainers"][0]["volumeMounts"]
    cmd = _init_command(_jobs(plan.stages)[0], runs)
    assert cmd[3:6] == ["launch", "wait", str(runs / "bt")]

    # an empty run directory: the gate keeps waiting
    (runs / "bt").mkdir(parents=True)
    waiting = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert waiting.stdout is not None
        seen = [waiting.stdout.readline() for _ in range(1)]  # its first look found no marker ...
        assert "pretraining not complete yet" in seen[0], seen
        with pytest.raises(subprocess.TimeoutExpired):  # ... and it keeps waiting (next look in 60 s)
            waiting.wait(timeout=2)
    finally:
        waiting.kill()
        waiting.communicate()

    # a run that trained to its last step (the real trainer writes the marker): the gate opens at once
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.arch=repro_convnet", "method.projector=16-16", "train.global_batch_size=8",
                             "optim.warmup_epochs=1", "log.progress=false", "log.tensorboard=false",
                             "data.num_workers=0", "train.num_steps=2", f"train.run_dir={runs / 'bt'}"])
    assert Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32).fit().step == 2
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pretraining is complete" in done.stdout + done.stderr, done.stderr


def test_pods_get_requests_and_limits_by_default(cfg_file: Path) -> None:
    plan = _plan(cfg_file, gpus_per_node=8)
    for job in _jobs(plan.pretrain + plan.stages):
        pod = job["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            res = c["resources"]
            # equal requests and limits for CPU and memory in every container: QoS class Guaranteed
            assert res["requests"] == res["limits"] and {"cpu", "memory"} <= set(res["requests"]), c["name"]
    main = plan.pretrain[2]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    # data.num_workers (4) + 1 CPUs per GPU process; 24Gi per GPU plus the 16Gi /dev/shm the memory emptyDir takes
    assert main == {"cpu": "40", "memory": f"{8 * 24 + 16}Gi", "nvidia.com/gpu": "8"}
    shm = {v["name"]: v for v in plan.pretrain[2]["spec"]["template"]["spec"]["volumes"]}["dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    cpu_pod = _plan(cfg_file, procs_per_node=2, overrides=["data.num_workers=1"]).pretrain[2]
    assert cpu_pod["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "4",
                                                                                            "memory": "24Gi"}


def test_scheduling_flags_data_volume_and_strict_validation(cfg_file: Path) -> None:
    tol = k8s.parse_toleration("nvidia.com/gpu:NoSchedule")
    plan = _plan(cfg_file, gpus_per_node=8, node_selector=dict([k8s.parse_selector("gpu=h100")]),
                 tolerations=[tol, k8s.parse_toleration("dedicated=ssl:NoExecute")], priority_class="training-high",
                 data_pvc="imagenet", kueue_queue="team-a", ib_resources=["rdma/ib=1"])
    for version in K8S_VERSIONS:
        k8s.validate_manifests(plan.pretrain + plan.stages, version)
    for job in _jobs(plan.pretrain + plan.stages):
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "training-high"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "dedicated", "operator": "Equal", "value": "ssl", "effect": "NoExecute"}]
        assert job["metadata"]["labels"][k8s.KUEUE_QUEUE_LABEL] == "team-a" and job["spec"]["suspend"] is True
        c = pod["containers"][0]
        assert {"name": "data", "mountPath": "/mnt/data", "readOnly": True} in c["volumeMounts"]
        assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"] == {"claimName": "imagenet",
                                                                                            "readOnly": True}
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert c["resources"]["limits"]["rdma/ib"] == c["resources"]["requests"]["rdma/ib"] == "1"
        for init in pod.get("initContainers", []):  # the gate needs no devices and no capability
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for bad, match in (("x:Sometimes", "Effect one of"), ("", "key")):
        with pytest.raises(ValueError, match=match):
            k8s.parse_toleration(bad)
    with pytest.raises(ValueError, match="key=value"):
        k8s.parse_selector("gpu")
    with pytest.raises(ValueError, match="rdma/ib=1"):
        _plan(cfg_file, ib_resources=["ib"])


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` operations (what the overlays use), as kustomize applies them."""
    out = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "add", op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node: Any = out
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[parts[-1]] = copy.deepcopy(op["value"])
    return out


def _render_command() -> list[str]:
    import shlex

    for line in (ROOT / "k8s" / "render.sh").read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["largessl", "launch", "k8s"]:
            return words
    raise AssertionError("k8s/render.sh has no `largessl launch k8s` line")


@pytest.mark.parametrize("overlay,flags", [("kueue", ["--kueue-queue", "largessl"]),
                                           ("infiniband", ["--ib-resource", "rdma/ib=1"])])
def test_overlays_equal_the_renderer_flags_and_validate(overlay: str, flags: list[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from largessl.cli import main

    kustomization = yaml.safe_load((ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    base = [m for m in yaml.safe_load_all((ROOT / "k8s" / "base" / "pretrain.yaml").read_text()) if m]
    patched = []
    for m in base:
        for patch in kustomization["patches"]:
            if m["kind"] == patch["target"]["kind"]:
                m = _json_patch(m, yaml.safe_load(patch["patch"]))
        patched.append(m)
    for version in K8S_VERSIONS:
        k8s.validate_manifests(patched, version)
    words = _render_command()
    words[words.index("--out") + 1] = str(tmp_path)
    monkeypatch.chdir(ROOT)
    assert main([*words[1:], *flags]) == 0
    rendered = [m for m in yaml.safe_load_all((tmp_path / "pretrain.yaml").read_text()) if m]
    assert patched == rendered
