"""Distributed bootstrap: the environment of torchrun, SLURM and Kubernetes Indexed Jobs, read purely."""

from __future__ import annotations

import pytest
import torch

from largessl.config import load_config
from largessl.distributed.env import DistEnv, _first_slurm_host, detect_env, init_distributed, resolve_backend


def test_single_process_default():
    env = detect_env({})
    assert env == DistEnv() and not env.distributed and env.is_main


def test_torchrun():
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("node7", 1234, "torchrun")


def test_torchrun_wins_over_slurm():
    # submitit's TorchDistributedEnvironment().export() and torchrun under srun set both families.
    env = detect_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env.source == "torchrun" and env.rank == 1


def test_slurm():
    env = detect_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                      "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.master_addr == "gpu07" and env.source == "slurm"
    assert env.master_port == 20000 + 1234  # derived from the job id so concurrent jobs differ


def test_slurm_tasks_per_node_with_repeat_count():
    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
                      "SLURM_NODELIST": "a1,a2"})
    assert env.local_world_size == 4 and env.master_addr == "a1"


@pytest.mark.parametrize("nodelist,first", [
    ("node[03-05,7],gpu1", "node03"), ("gpu1,node[1-2]", "gpu1"), ("a-b[10,12]", "a-b10"), ("solo", "solo"),
])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_kubernetes_indexed_job():
    env = detect_env({"JOB_COMPLETION_INDEX": "2", "LARGESSL_WORLD_SIZE": "4",
                      "LARGESSL_MASTER_SERVICE": "ssl-headless", "LARGESSL_JOB_NAME": "pretrain"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (2, 4, 0, "k8s")
    assert env.master_addr == "pretrain-0.ssl-headless"  # pod 0's stable DNS name behind the headless service
    with pytest.raises(RuntimeError, match="LARGESSL_MASTER_SERVICE"):
        detect_env({"JOB_COMPLETION_INDEX": "0", "LARGESSL_WORLD_SIZE": "2"})


def test_bad_integers_are_environment_errors():
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        detect_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(RuntimeError, match="rank 4 is outside"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_backend_choice():
    cuda = torch.device("cuda", 0)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    # CUDA runs get a group that serves both devices: NCCL alone has no CPU backend.
    assert resolve_backend("auto", cuda) == "cpu:gloo,cuda:nccl"
    assert resolve_backend("nccl", cuda) == "cpu:gloo,cuda:nccl"
    # explicit device maps are taken as given (the GPU tier asks for a group without a CPU backend)
    assert resolve_backend("cuda:gloo", cuda) == "cuda:gloo"
    assert resolve_backend("cuda:nccl, cpu:gloo", cuda) == "cuda:nccl,cpu:gloo"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="no backend for this run's cpu"):
        resolve_backend("cuda:nccl", torch.device("cpu"))


@pytest.mark.parametrize("spec, message", [
    ("ncl", "is not auto, gloo, nccl"),
    ("cpu:nccl", "NCCL has no CPU backend"),
    ("tpu:gloo", "is not DEVICE:BACKEND"),
    ("cuda:nccl,cuda:gloo", "names device 'cuda' twice"),
])
def test_bad_backend_is_a_config_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_config([], [f"dist.backend={spec}"])


def test_init_is_a_no_op_for_one_process():
    init_distributed(DistEnv())
    assert not torch.distributed.is_initialized()


def test_local_rank_comes_from_local_rank_else_slurm_localid_else_zero():
    from largessl.distributed.env import local_rank_from_env

    assert local_rank_from_env({"LOCAL_RANK": "2", "SLURM_LOCALID": "5"}) == 2
    assert local_rank_from_env({"SLURM_LOCALID": "3"}) == 3  # plain srun sets no LOCAL_RANK
    assert local_rank_from_env({}) == 0
    # torchrun-style variables exported without LOCAL_RANK under srun: the node-local id still comes from SLURM
    env = detect_env({"RANK": "5", "WORLD_SIZE": "8", "SLURM_LOCALID": "1", "LOCAL_WORLD_SIZE": "4"})
    assert env.local_rank == 1


class _FakeCuda:
    """torch.cuda as a node with ``count`` visible devices: records set_device."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.set: list[int] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set.append)


@pytest.mark.parametrize(("count", "local_rank", "index"), [(1, 3, 0), (4, 2, 2), (8, 0, 0)])
def test_the_local_device_is_the_visible_one(monkeypatch, count, local_rank, index):
    """--gpus-per-task=1 / --gpu-bind: each task sees one device, cuda:0, whatever its local rank."""
    from largessl.run.precision import resolve_device

    cuda = _FakeCuda(monkeypatch, count)
    assert resolve_device("cuda", local_rank) == torch.device("cuda", index)
    assert cuda.set == [index]


def test_more_local_ranks_than_devices_wrap_around_with_a_warning(monkeypatch, caplog):
    from largessl.run.precision import resolve_device

    _FakeCuda(monkeypatch, 2)
    assert resolve_device("auto", 3) == torch.device("cuda", 1)
    assert "local rank 3 but only 2 visible CUDA devices" in caplog.text


def test_eval_stages_put_the_backbone_on_the_slurm_local_device(monkeypatch, tmp_path):
    """After pretraining under plain srun (no LOCAL_RANK) each rank evaluates on its own device."""
    from largessl import stages
    from largessl.eval import runner, source

    class _Source:
        backbone = torch.nn.Linear(2, 2)

    cuda = _FakeCuda(monkeypatch, 4)
    moved: list[torch.device] = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(source, "load_source", lambda ckpt, cfg: (_Source(), None))
    monkeypatch.setattr(_Source.backbone, "to", lambda device: moved.append(device))
    monkeypatch.setattr(runner, "evaluate_knn", lambda cfg, src, run_dir, device: {"top1": 0.0})
    cfg = load_config(None, ["train.device=cuda"])
    assert stages.run_stages(cfg, tmp_path, ["knn"]) == {"knn": {"top1": 0.0}}
    assert moved == [torch.device("cuda", 3)] and cuda.set == [3]


def test_torchrun_restarts_through_the_shared_agent_store_are_named_with_the_fix() -> None:
    from largessl.distributed.env import torchrun_restart_hazard

    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in torchrun_restart_hazard(shared)
    assert torchrun_restart_hazard({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) == ""  # the fix applied
    assert torchrun_restart_hazard({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) == ""  # nothing to restart
    assert torchrun_restart_hazard({}) == ""  # not torchrun
