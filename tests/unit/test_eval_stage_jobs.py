"""Stage jobs with real resources: ``stages.<name>`` → SLURM jobs and Kubernetes Jobs, validated and requeueable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from largessl.cli import main
from largessl.config import StageConfig, load_config
from largessl.distributed.env import detect_env
from largessl.launch import k8s, slurm
from largessl.launch.node import rank_environments
from largessl.run import exit_codes

K8S_VERSIONS = ("1.30.0", "1.33.0")

STAGES_YAML = """
stages:
  linear: {nodes: 2, gpus_per_node: 4, time: "6:00:00"}
  knn: {}
  finetune: {gpus_per_node: 2}
  push:
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"train: {{run_dir: {tmp_path / 'run'}, num_steps: 10}}\n"
                 "data: {train_manifest: s3://b/in1k/train/manifest.json, val_manifest: s3://b/in1k/val/manifest.json}\n"
                 + STAGES_YAML)
    return p


def test_stages_config_takes_a_list_or_resources_per_stage(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_file)
    assert list(cfg.stages) == ["linear", "knn", "finetune", "push"]
    assert cfg.stage_config("linear") == StageConfig(nodes=2, gpus_per_node=4, time="6:00:00")
    assert cfg.stage_config("knn") == StageConfig() and cfg.stage_config("push") == StageConfig()
    as_list = load_config(None, ["stages=[knn, linear]"])
    assert as_list.stages == ["knn", "linear"] and as_list.stage_config("linear") == StageConfig()
    with pytest.raises(ValueError, match=r"unknown config key 'stages.linear.gpus'.*gpus_per_node, nodes, time"):
        load_config(None, ["stages={linear: {gpus: 2}}"])
    with pytest.raises(ValueError, match="stages.knn.nodes must be >= 1"):
        load_config(None, ["stages={knn: {nodes: 0}}"])
    with pytest.raises(ValueError, match="stages.knn.time='two hours' is not a SLURM time"):
        load_config(None, ["stages={knn: {time: two hours}}"])
    with pytest.raises(ValueError, match="unknown stage"):
        load_config(None, ["stages={segment: {}}"])


def _k8s_plan(cfg_file: Path, **kw) -> k8s.K8sPlan:
    # offline: the s3:// manifests are not reachable here (the submit-time checks have their own tests)
    req = k8s.K8sRequest(config=[str(cfg_file)], nodes=4, image="reg.example/largessl:0.1", pvc="runs",
                         overrides=["train.run_dir=runs/bt"], offline=True, **kw)
    return k8s.plan_manifests(req)


def _jobs(plan: k8s.K8sPlan) -> dict[str, dict]:
    return {m["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in plan.stages if m["kind"] == "Job"}


@pytest.mark.parametrize("gpus", [8, 0])
def test_k8s_stage_jobs_request_their_resources_and_validate(cfg_file: Path, gpus: int) -> None:
    plan = _k8s_plan(cfg_file, gpus_per_node=gpus, procs_per_node=2)
    for version in K8S_VERSIONS:
        k8s.validate_manifests(plan.pretrain + plan.stages, version)
    # the multi-node stage brings its own headless Service for the rendezvous
    assert [m["kind"] for m in plan.stages] == ["Service", "Job", "Job", "Job", "Job"]
    jobs = _jobs(plan)
    # linear and finetune name their GPUs; knn takes the pretraining pods' (or their CPU processes)
    expected = {"linear": (2, 4, 4), "knn": (1, gpus, gpus or 2), "finetune": (1, 2, 2), "push": (1, 0, 1)}
    for stage, (nodes, want_gpus, nproc) in expected.items():
        spec = jobs[stage]["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
        assert c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", "0") == str(want_gpus), stage
        if nproc > 1:
            assert c["args"][:4] == ["launch", "node", "--nproc-per-node", str(nproc)]
        cmd = c["args"][c["args"].index("--") + 1:] if nproc > 1 else c["args"]
        assert cmd[:2] == (["hub", "push"] if stage == "push" else ["eval", stage])
        # requeue like pretraining: disruptions and 75 are retried on a new pod without counting as failures,
        # bug codes fail fast
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert rules[1]["action"] == "Ignore" and rules[1]["onExitCodes"]["values"] == [exit_codes.REQUEUE]
        assert rules[2]["action"] == "FailJob" and rules[2]["onExitCodes"]["values"] == sorted(exit_codes.FAIL_FAST)
        assert pod["restartPolicy"] == "Never"
        if stage != "push":
            assert spec["backoffLimit"] == 6 * nodes and spec["podReplacementPolicy"] == "Failed"  # per lost pod
            assert {"name": "runs", "mountPath": "/mnt/runs"} in c["volumeMounts"]  # the checkpoint survives


@pytest.mark.parametrize("gpus", [8, 0])
def test_k8s_stage_pod_environment_gives_every_rank_its_place(cfg_file: Path, gpus: int) -> None:
    plan = _k8s_plan(cfg_file, gpus_per_node=gpus, procs_per_node=2)
    jobs = _jobs(plan)
    service = next(m for m in plan.stages if m["kind"] == "Service")
    for stage, nodes, nproc in [("linear", 2, 4), ("knn", 1, gpus or 2)]:
        job = jobs[stage]
        name = job["metadata"]["name"]
        seen = []
        for index in range(nodes):
            for e in rank_environments(k8s.pod_environment(job, index), nproc):
                d = detect_env(e)
                assert d.world_size == nodes * nproc and d.local_world_size == nproc
                assert d.master_addr == (f"{name}-0.{name}" if nodes > 1 else "127.0.0.1")
                seen.append(d.rank)
        assert sorted(seen) == list(range(nodes * nproc))
        if nodes > 1:
            assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == name
            assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_slurm_dry_run_requests_the_configured_gpus_per_stage(cfg_file: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["launch", "slurm", "--config", str(cfg_file), "--nodes", "4", "--gpus-per-node", "8",
                 "--time", "24:00:00", "--dry-run", "--offline"])
    out = capsys.readouterr().out
    assert code == 0
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == 5  # pretraining + linear, knn, finetune, push
    want = {
        "largessl-linear": ["--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=360"],
        "largessl-knn": ["--nodes=1", "--gpus-per-node=8", "--ntasks-per-node=8", "--time=1440"],
        "largessl-finetune": ["--nodes=1", "--gpus-per-node=2", "--ntasks-per-node=2"],
        "largessl-push": ["--nodes=1", "--ntasks-per-node=1"],
    }
    for script in scripts[1:]:
        name = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
        for line in [*want[name], "--requeue", "--signal=USR2@120", "--kill-on-invalid-dep=yes"]:
            assert f"#SBATCH {line}\n" in script, (name, line)
        assert "#SBATCH --dependency=" in script
        if name == "largessl-push":
            assert "gpus" not in script
    assert "#SBATCH --nodes=4\n" in scripts[0] and "#SBATCH --gpus-per-node=8\n" in scripts[0]


def test_slurm_stage_jobs_run_the_cli_in_every_task_and_requeue(cfg_file: Path) -> None:
    plan = slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], gpus_per_node=8, offline=True))
    assert plan.stage_names == ["linear", "knn", "finetune", "push"]
    assert plan.stage_argv[0][:2] == ["eval", "linear"] and plan.stage_argv[3][:2] == ["hub", "push"]
    job = slurm.EvalStageJob(plan.stage_argv[0])
    assert isinstance(job, slurm.PretrainJob)  # same requeue path: exit 75 -> scontrol requeue -> resume
    again = pickle.loads(pickle.dumps(job))
    assert again.argv == plan.stage_argv[0] and job.checkpoint().function is job
    assert slurm.stage_parameters(plan, "push", "afterok:1")["ntasks_per_node"] == 1
    cpu = slurm.plan_job(slurm.SlurmRequest(config=[str(cfg_file)], tasks_per_node=3, offline=True,
                                            overrides=["train.global_batch_size=2046"]))
    knn = slurm.stage_parameters(cpu, "knn", "afterok:1")
    assert knn["ntasks_per_node"] == 3 and "gpus_per_node" not in knn
