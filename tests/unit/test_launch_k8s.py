"""Kubernetes rendering: strict schema validation, failure policy, the pod environment contract, committed manifests."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from largessl.cli import main
from largessl.config import load_config
from largessl.distributed.env import detect_env
from largessl.launch import k8s
from largessl.launch.node import combine_exit_codes, rank_environments
from largessl.run import exit_codes

K8S_VERSIONS = ("1.30.0", "1.33.0")
"""Validated against an older supported release and a recent one (bundled strict schemas)."""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text("train: {run_dir: runs/bt-r50, num_steps: 100}\nstages: [knn]\n"
                 "data: {train_manifest: s3://bucket/in1k/train/manifest.json, "
                 "val_manifest: s3://bucket/in1k/val/manifest.json}\n")
    return p


def _plan(cfg_file: Path, **kw) -> k8s.K8sPlan:
    # offline: s3://bucket is not reachable here (the submit-time checks are tested in test_submit_checks.py)
    req = k8s.K8sRequest(config=[str(cfg_file)], nodes=kw.pop("nodes", 4), image="reg.example/largessl:0.1",
                         pvc=kw.pop("pvc", "runs"), offline=kw.pop("offline", True), **kw)
    return k8s.plan_manifests(req)


@pytest.mark.parametrize("gpus", [0, 8])
def test_rendered_manifests_validate_strictly(cfg_file: Path, gpus: int) -> None:
    plan = _plan(cfg_file, gpus_per_node=gpus, cpu="8", memory="64Gi")
    assert [m["kind"] for m in plan.pretrain] == ["ConfigMap", "Service", "Job"]
    assert [m["kind"] for m in plan.stages] == ["Job"]
    for version in K8S_VERSIONS:
        k8s.validate_manifests(plan.pretrain + plan.stages, version)
    # the YAML written to disk / kubectl is the same objects
    assert list(yaml.safe_load_all(k8s.to_yaml(plan.pretrain))) == plan.pretrain


def test_strict_validation_rejects_unknown_fields(cfg_file: Path) -> None:
    job = _plan(cfg_file).pretrain[2]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(ValueError, match="Job/largessl-bt-r50 is invalid"):
        k8s.validate_manifests([job], K8S_VERSIONS[-1])


def test_job_policy_and_pod_shape(cfg_file: Path, tmp_path: Path) -> None:
    plan = _plan(cfg_file, gpus_per_node=8, grace_seconds=900)
    svc, job = plan.pretrain[1], plan.pretrain[2]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 900
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    rules = spec["podFailurePolicy"]["rules"]
    # first matching rule wins: disruptions and the requeue code (every rank saved) never count against
    # backoffLimit; the trainer's bug codes fail the Job at once; 3 (storage, dead peer) is retried
    assert rules == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [1, 2, 4, 5]}},
    ]
    assert exit_codes.REQUEUE == 75 and sorted(exit_codes.FAIL_FAST) == [1, 2, 4, 5]
    # one lost pod ends its 3 peers with exit 3 too, and Kubernetes counts every failed pod: the default budget of 6
    # failures is 6 x 4 pods (a plain 6 would fail a 16-pod job at its first lost pod)
    assert spec["backoffLimit"] == 24
    assert _plan(cfg_file, nodes=16, backoff_limit=2).pretrain[2]["spec"]["backoffLimit"] == 32
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["args"][:4] == ["launch", "node", "--nproc-per-node", "8"]
    assert c["envFrom"] == [{"secretRef": {"name": "largessl-s3", "optional": False}}]  # s3:// data
    assert {v["name"]: v for v in pod["volumes"]}["runs"]["persistentVolumeClaim"]["claimName"] == "runs"
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    # the resolved config in the ConfigMap points the run at the volume and leaves stages to their Jobs
    (tmp_path / "pod.yaml").write_text(plan.pretrain[0]["data"]["config.yaml"])
    cfg = load_config(tmp_path / "pod.yaml")
    assert cfg.train.run_dir == "/mnt/runs/runs/bt-r50" and cfg.stages == [] and cfg.train.num_steps == 100
    stage = plan.stages[0]["spec"]["template"]["spec"]["containers"][0]
    # a stage job defaults to 1 node x the pretraining pods' GPUs, one process per GPU
    assert stage["args"][:6] == ["launch", "node", "--nproc-per-node", "8", "--", "eval"]
    assert stage["args"][6] == "knn" and "/mnt/runs/runs/bt-r50" in stage["args"]


@pytest.mark.parametrize("part", ["pretrain", "stage"])
def test_pods_run_hardened(cfg_file: Path, part: str) -> None:
    plan = _plan(cfg_file, gpus_per_node=8)
    job = plan.pretrain[2] if part == "pretrain" else plan.stages[0]
    pod = job["spec"]["template"]["spec"]
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == sec["runAsGroup"] == 1000
    assert sec["fsGroup"] == 1000  # a root-owned PVC becomes writable for UID 1000 (the image's user)
    assert sec["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    for version in K8S_VERSIONS:
        k8s.validate_manifests([job], version)
    with pytest.raises(ValueError, match="non-root"):
        _plan(cfg_file, run_as_user=0)


def test_multi_pod_pvc_must_be_read_write_many(cfg_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        _plan(cfg_file, nodes=1)
    assert "ReadWriteMany" not in caplog.text
    with caplog.at_level("WARNING"):
        _plan(cfg_file, nodes=4)
    assert "ReadWriteMany" in caplog.text and "checkpoint.dir=s3://" in caplog.text


def test_resume_needs_a_volume_or_object_storage(cfg_file: Path) -> None:
    with pytest.raises(ValueError, match="--pvc"):
        _plan(cfg_file, pvc=None)
    plan = _plan(cfg_file, pvc=None, overrides=["checkpoint.dir=s3://bucket/ckpt"])
    assert "persistentVolumeClaim" not in str(plan.pretrain[2])
    with pytest.raises(ValueError, match="outside the PVC"):
        _plan(cfg_file, overrides=["train.run_dir=/data/run"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_pod_environment_contract(cfg_file: Path, nproc: int) -> None:
    """What each pod's ranks derive from exactly the manifest's env: ranks, world, master <job>-0.<svc>."""
    plan = _plan(cfg_file, nodes=3, procs_per_node=nproc, overrides=["train.global_batch_size=2046"])
    job = plan.pretrain[2]
    seen = []
    for index in range(3):
        env = k8s.pod_environment(job, index)
        assert env["JOB_COMPLETION_INDEX"] == str(index)
        if nproc == 1:
            envs = [env]  # the container runs `largessl pretrain` directly
        else:
            envs = rank_environments(env, nproc)  # `largessl launch node` starts the ranks
        for e in envs:
            d = detect_env(e)
            assert d.world_size == 3 * nproc and d.master_addr == f"{plan.name}-0.{plan.service}"
            assert d.master_port == 29500 and d.local_world_size == nproc
            seen.append(d.rank)
    assert sorted(seen) == list(range(3 * nproc))


def test_rank_environments_reject_bad_contract() -> None:
    base = {"JOB_COMPLETION_INDEX": "2", "LARGESSL_WORLD_SIZE": "4", "MASTER_ADDR": "x"}
    with pytest.raises(RuntimeError, match="outside the 2 node"):
        rank_environments(base, 2)
    with pytest.raises(ValueError, match="multiple"):
        rank_environments(dict(base, LARGESSL_WORLD_SIZE="5"), 2)
    with pytest.raises(RuntimeError, match="LARGESSL_WORLD_SIZE is not set"):
        rank_environments({"JOB_COMPLETION_INDEX": "0"}, 1)


def test_exit_code_combination() -> None:
    assert combine_exit_codes([0, 0]) == exit_codes.OK
    assert combine_exit_codes([75, 75]) == exit_codes.REQUEUE
    assert combine_exit_codes([75, exit_codes.BAD_INPUT]) == exit_codes.BAD_INPUT  # fail fast wins
    assert combine_exit_codes([exit_codes.ENVIRONMENT, 0]) == exit_codes.ENVIRONMENT
    assert combine_exit_codes([-9, 0]) == exit_codes.ENVIRONMENT


def test_dns_names() -> None:
    assert k8s.dns_name("Runs/BT_r50.v2") == "runs-bt-r50-v2"
    assert len(k8s.dns_name("x" * 100)) == 50
    with pytest.raises(ValueError):
        k8s.dns_name("///")


def _render_command(repo_root: Path) -> list[str]:
    """The `largessl launch k8s ...` line in k8s/render.sh that produced k8s/base."""
    for line in (repo_root / "k8s" / "render.sh").read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] == ["largessl", "launch", "k8s"]:
            return words
    raise AssertionError("k8s/render.sh has no `largessl launch k8s` line")


def test_committed_manifests_validate_and_match_the_renderer(repo_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """k8s/base validates and is exactly what k8s/render.sh renders today (regenerate it when this fails)."""
    base = repo_root / "k8s" / "base"
    committed = {}
    for f in sorted(base.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for m in yaml.safe_load_all(f.read_text()):
            if m:
                committed[(m["kind"], m["metadata"]["name"])] = m
    assert committed, "k8s/base holds no manifests"
    for version in K8S_VERSIONS:
        k8s.validate_manifests(list(committed.values()), version)
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    # stages.yaml is applied on its own once pretraining completed (kubectl apply -f k8s/base/stages.yaml)
    assert kustomization["resources"] == ["pretrain.yaml"]
    words = _render_command(repo_root)
    out = words.index("--out")
    words[out + 1] = str(tmp_path)
    monkeypatch.chdir(repo_root)
    assert main(words[1:]) == 0
    rendered = {}
    for f in sorted(tmp_path.glob("*.yaml")):
        for m in yaml.safe_load_all(f.read_text()):
            rendered[(m["kind"], m["metadata"]["name"])] = m
    assert rendered == committed, "k8s/base is stale: run k8s/render.sh"
