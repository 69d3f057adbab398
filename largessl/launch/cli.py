"""``largessl launch slurm|k8s|node``: submit pretraining to SLURM, render/apply Kubernetes jobs, run a pod's ranks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[],
                   help="pretraining config file (repeatable; later wins), e.g. configs/barlow_twins_r50_in1k.yaml")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one process each (0 = CPU)")
    p.add_argument("--offline", action="store_true",
                   help="skip the submit-time checks that read the manifests or write the storage from this machine "
                        "(when it cannot reach them); the config, the batch vs the world size and the stages' "
                        "inputs are still checked")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="passed to `largessl pretrain`: resume although KEY differs from the checkpoint's config")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="passed to `largessl pretrain`: start again when no checkpoint verifies")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.run_dir=runs/bt")


def _pretrain_flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--allow-change={k.strip()}" for v in args.allow_change for k in v.split(",") if k.strip()]
    return flags + (["--restart-from-scratch"] if args.restart_from_scratch else [])


def add_slurm_arguments(s: argparse.ArgumentParser, stage_jobs: bool = True) -> None:
    """Options of a SLURM submission (``launch slurm``, ``sweep slurm``)."""
    _common(s)
    s.add_argument("--tasks-per-node", type=int, default=1, help="processes per node on CPU clusters")
    s.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (data workers + 1)")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--time", default="24:00:00", help="time limit per run (minutes, H:MM:SS or D-HH:MM:SS); "
                   "the job is requeued and resumes when it runs out")
    s.add_argument("--job-name", default="largessl")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM asks the job to checkpoint")
    s.add_argument("--log-dir", default=None, help="submitit folder (default <run_dir>/slurm; shared filesystem)")
    s.add_argument("--setup", action="append", default=[], help="shell line run before srun (repeatable)")
    if stage_jobs:
        s.add_argument("--no-stage-jobs", action="store_true",
                       help="run the config's stages inside the pretraining job instead of as afterok jobs")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")


def add_k8s_arguments(k: argparse.ArgumentParser) -> None:
    """Options of a Kubernetes rendering (``launch k8s``, ``sweep k8s``)."""
    _common(k)
    k.add_argument("--image", required=True, help="container image (see docker/README.md)")
    k.add_argument("--namespace", default="default")
    k.add_argument("--name", default="", help="Job name (default from train.run_dir)")
    k.add_argument("--procs-per-node", type=int, default=1, help="processes per CPU pod (no GPUs)")
    k.add_argument("--cpu", default=None,
                   help="CPU request = limit per pod, e.g. 32 (default: data.num_workers + 1 per process)")
    k.add_argument("--memory", default=None,
                   help="memory request = limit per pod, e.g. 200Gi (default: 24Gi per GPU, 4Gi per CPU process, "
                        "plus --shm-size)")
    k.add_argument("--shm-size", default="16Gi", help="/dev/shm size per pod (a memory emptyDir's sizeLimit)")
    k.add_argument("--pvc", default=None, help="PersistentVolumeClaim for the run directory (mounted at /mnt/runs)")
    k.add_argument("--data-pvc", default=None,
                   help="PersistentVolumeClaim holding the dataset, mounted read-only at --data-mount")
    k.add_argument("--data-mount", default="/mnt/data", help="where --data-pvc is mounted (default /mnt/data)")
    k.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="nodeSelector entry of every pod (repeatable)")
    k.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="toleration of every pod (repeatable), e.g. nvidia.com/gpu:NoSchedule")
    k.add_argument("--priority-class", default=None, help="priorityClassName of every pod")
    k.add_argument("--kueue-queue", default=None, metavar="LOCAL_QUEUE",
                   help="submit through Kueue: Jobs are created suspended with the queue label and admitted whole "
                        "(gang scheduling; see docs/operations.md)")
    k.add_argument("--ib-resource", action="append", default=[], metavar="NAME=COUNT",
                   help="RDMA/InfiniBand device per pod, e.g. rdma/ib=1 (repeatable); adds the IPC_LOCK capability")
    k.add_argument("--s3-secret", default="largessl-s3", help="Secret with AWS_* credentials for s3:// paths")
    k.add_argument("--port", type=int, default=29500, help="rendezvous port on node 0")
    k.add_argument("--grace-seconds", type=int, default=600, help="terminationGracePeriodSeconds")
    k.add_argument("--backoff-limit", type=int, default=6,
                   help="failures of the job (a lost pod, storage errors; disruptions and requeues excluded) before "
                        "it fails; the Job's backoffLimit is this x --nodes, as one lost pod ends all its peers (exit 3)")
    k.add_argument("--service-account", default=None)
    k.add_argument("--out", default=None, help="write pretrain.yaml (and stages.yaml) into this folder")
    k.add_argument("--apply", action="store_true", help="kubectl apply the pretraining manifests")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``largessl launch``."""
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)

    s = sub.add_parser("slurm", help="submit through submitit (requeued on preemption/time-out, resumes)")
    add_slurm_arguments(s)

    k = sub.add_parser("k8s", help="render (and --apply) an Indexed Job + headless Service")
    add_k8s_arguments(k)

    n = sub.add_parser("node", help="run this node's ranks with torchrun's variables, keeping their exit codes "
                                    "(in a pod, or on one machine instead of torchrun)")
    from largessl.launch import node

    node.add_arguments(n)

    w = sub.add_parser("wait", help="block until a pretraining run is complete (its completion marker exists); the "
                                    "init container of Kubernetes stage Jobs")
    w.add_argument("location", help="run directory or checkpoint directory (a path or s3://...)")
    w.add_argument("--poll-seconds", type=float, default=30.0, help="time between looks")
    w.add_argument("--timeout-seconds", type=float, default=0.0, help="give up after this long (exit 3); 0 = never")
    w.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")


def slurm_request(args: argparse.Namespace, overrides: list[str] | None = None,
                  submit_stages: bool = True) -> Any:
    """The :class:`~largessl.launch.slurm.SlurmRequest` of parsed :func:`add_slurm_arguments` options."""
    from largessl.launch import slurm

    return slurm.SlurmRequest(
        config=args.config, overrides=list(args.overrides if overrides is None else overrides), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb, partition=args.partition, account=args.account, qos=args.qos,
        time_min=slurm.parse_time(args.time), job_name=args.job_name, signal_delay_s=args.signal_delay,
        log_dir=args.log_dir, setup=args.setup, submit_stages=submit_stages, offline=args.offline,
        pretrain_flags=_pretrain_flags(args))


def _run_slurm(args: argparse.Namespace) -> int:
    from largessl.launch import slurm

    req = slurm_request(args, submit_stages=not args.no_stage_jobs)
    plan = slurm.plan_job(req)
    if args.dry_run:
        print(slurm.render_sbatch(plan))
        print(f"# each task runs: largessl {' '.join(plan.pretrain_argv)}")
        for i, cmd in enumerate(plan.stage_commands):
            print(f"# then (afterok): {' '.join(cmd)}")
            print(slurm.render_stage_sbatch(plan, i))
        print(f"# run directory: {plan.run_dir}")
        return 0
    done = slurm.submit(plan)
    print(f"submitted SLURM job {done.job_id} ({req.nodes} node(s) x {req.ntasks_per_node} task(s))")
    print(f"  stdout:  {done.stdout}")
    print(f"  stderr:  {done.stderr}")
    print(f"  logs:    {done.folder / done.job_id}")
    print(f"  run dir: {done.run_dir}")
    for stage, jid in zip(plan.cfg.stages, done.stage_job_ids):
        print(f"  stage {stage}: job {jid} (afterok)")
    sys.stdout.flush()
    return 0


def k8s_request(args: argparse.Namespace, overrides: list[str] | None = None) -> Any:
    """The :class:`~largessl.launch.k8s.K8sRequest` of parsed :func:`add_k8s_arguments` options."""
    from largessl.launch import k8s

    return k8s.K8sRequest(
        config=args.config, overrides=list(args.overrides if overrides is None else overrides), nodes=args.nodes,
        image=args.image,
        namespace=args.namespace, name=args.name, gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node, cpu=args.cpu, memory=args.memory, shm_size=args.shm_size,
        pvc=args.pvc, s3_secret=args.s3_secret, port=args.port, grace_seconds=args.grace_seconds,
        backoff_limit=args.backoff_limit, service_account=args.service_account, data_pvc=args.data_pvc,
        data_mount=args.data_mount, node_selector=dict(k8s.parse_selector(t) for t in args.node_selector),
        tolerations=[k8s.parse_toleration(t) for t in args.toleration], priority_class=args.priority_class,
        kueue_queue=args.kueue_queue, ib_resources=list(args.ib_resource), offline=args.offline,
        pretrain_flags=_pretrain_flags(args))


def _run_k8s(args: argparse.Namespace) -> int:
    from largessl.launch import k8s

    req = k8s_request(args)
    plan = k8s.plan_manifests(req)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain.yaml").write_text(k8s.to_yaml(plan.pretrain))
        if plan.stages:
            (out / "stages.yaml").write_text(k8s.to_yaml(plan.stages))
        print(f"wrote {out / 'pretrain.yaml'}" + (f" and {out / 'stages.yaml'}" if plan.stages else ""))
    elif not args.apply:
        print(k8s.to_yaml(plan.pretrain + plan.stages), end="")
    if args.apply:
        print(k8s.apply(plan.pretrain), end="")
        print(f"job {plan.name}: kubectl -n {req.namespace} logs -f job/{plan.name}; run dir {plan.run_dir}")
        if plan.stages:
            print("stage Jobs (stages.yaml, write it with --out) wait in an init container until pretraining is "
                  "complete, holding their GPUs while they wait: apply them when pretraining nears its end")
    return 0


def _run_wait(args: argparse.Namespace) -> int:
    from largessl.distributed.env import DistEnv, setup_logging
    from largessl.run.completion import wait_for_marker

    if args.poll_seconds <= 0 or args.timeout_seconds < 0:
        raise ValueError("--poll-seconds must be > 0 and --timeout-seconds >= 0")
    logging.getLogger().handlers.clear()
    setup_logging(DistEnv())
    wait_for_marker(args.location, args.poll_seconds, args.timeout_seconds, args.endpoint_url)
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry of ``largessl launch``."""
    if args.target == "slurm":
        return _run_slurm(args)
    if args.target == "k8s":
        return _run_k8s(args)
    if args.target == "wait":
        return _run_wait(args)
    from largessl.launch import node

    return node.run(args)
