"""Render (and optionally apply) Kubernetes manifests for pretraining: an Indexed Job behind a headless Service.

Pod ``i`` of the Indexed Job is node ``i`` (``JOB_COMPLETION_INDEX``); node 0 hosts the rendezvous at
``<job>-0.<service>:<port>`` (Indexed Job pods get the hostname ``<job>-<index>`` and, with
``subdomain: <service>``, a DNS name under the headless Service). The environment contract each pod gets:

* ``JOB_COMPLETION_INDEX`` — node rank (from the pod's completion-index annotation);
* ``LARGESSL_JOB_NAME``, ``LARGESSL_MASTER_SERVICE`` — master address ``<job>-0.<service>``;
* ``LARGESSL_WORLD_SIZE`` — total processes (nodes x processes per node); ``MASTER_PORT``.

With one process per pod the container runs ``largessl pretrain`` and ``largessl.distributed.env.detect_env``
reads this contract directly. With several GPUs per pod it runs ``largessl launch node``, which starts one
process per GPU with torchrun's variables (see :mod:`largessl.launch.node`; torchrun itself would turn
every worker exit code into 1 and give workers only 30 s after SIGTERM, defeating the podFailurePolicy
below and the final checkpoint).

Restarts: ``restartPolicy: Never`` with a podFailurePolicy whose rules, first match wins, are: ignore
disruptions (preemption, eviction, node drain: the ``DisruptionTarget`` condition), ignore exit code 75 (a
rank that saved a checkpoint on a stop request: when one pod is preempted, every rank agrees to stop, saves
and exits 75, and none of that counts against ``backoffLimit``), and fail the Job at once on the trainer's
bug exit codes (1, 2, 4, 5). Code 3 (storage, a dead peer) counts against ``backoffLimit`` and is retried; as one
lost pod ends all its peers with 3, ``backoffLimit`` is the failure budget times the pod count.
The run directory lives on a PVC, or checkpoints on object storage, so a replacement pod resumes. With
several pods every pod writes the shared checkpoint folder: the PVC must be ReadWriteMany (NFS, CephFS,
Filestore, EFS...), or use ``checkpoint.dir=s3://...`` (then only pod 0 writes the run directory).

Pods run hardened: non-root UID/GID 1000 (the image's user) with ``fsGroup`` so a root-owned volume is
writable, no privilege escalation, every capability dropped (``IPC_LOCK`` added back with ``ib_resources``), the
runtime's default seccomp profile; equal CPU and memory requests and limits (QoS Guaranteed) with defaults from the
process count. Stage Jobs wait in an init container (``largessl launch wait``) for the pretraining's completion
marker (:func:`stage_gate`). ``node_selector``, ``tolerations``, ``priority_class``, ``data_pvc``, ``kueue_queue``
(Jobs created suspended with the queue label) fit the pods to a cluster. :func:`plan_manifests` runs the
submit-time checks (``largessl.run.preflight``) first.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from largessl.config import EVAL_STAGES, Config, config_to_dict, config_to_yaml, load_config, unique_run_dir
from largessl.run import exit_codes

log = logging.getLogger(__name__)

CONTAINER = "trainer"
CONFIG_DIR = "/etc/largessl"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
RUNS_MOUNT = "/mnt/runs"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
LABEL = "largessl/job"
DEFAULT_PORT = 29500


def dns_name(text: str, max_len: int = 50) -> str:
    """A DNS-1123 label from free text (lowercase alphanumerics and '-'), short enough for pod hostnames."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    if not name:
        raise ValueError(f"cannot derive a Kubernetes name from {text!r}; pass --name")
    return name


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DATA_MOUNT = "/mnt/data"
CPU_PER_WORKER = 1
"""Default CPU request per process: its DataLoader workers (data.num_workers) plus one for the process itself."""
MEMORY_GIB_PER_GPU = 24
MEMORY_GIB_PER_CPU_PROCESS = 4
"""Default memory per process (GPU pods: the batches its workers prefetch and pinned host copies; CPU pods: the
model too); the pod's limit adds the /dev/shm size, which the memory-backed emptyDir charges to the pod."""
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_IMAGE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:\d+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[\w][\w.-]{0,127})?"
                    r"(@sha256:[a-f0-9]{64})?$", re.IGNORECASE)


def parse_toleration(text: str) -> dict[str, Any]:
    """``key=value:Effect``, ``key:Effect``, ``key=value`` or ``key`` → a pod toleration."""
    spec, _, effect = text.partition(":")
    key, eq, value = spec.partition("=")
    if not key or (effect and effect not in TOLERATION_EFFECTS):
        raise ValueError(f"--toleration {text!r}: use key[=value][:Effect] with Effect one of "
                         f"{', '.join(TOLERATION_EFFECTS)} (e.g. nvidia.com/gpu:NoSchedule)")
    tol: dict[str, Any] = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        tol["effect"] = effect
    return tol


def parse_selector(text: str) -> tuple[str, str]:
    """``key=value`` → (key, value) of a nodeSelector entry."""
    key, eq, value = text.partition("=")
    if not key or not eq:
        raise ValueError(f"--node-selector {text!r}: use key=value (e.g. nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3)")
    return key, value


def parse_resource(text: str) -> tuple[str, str]:
    """``rdma/ib=1`` → an extended resource and its count."""
    name, eq, count = text.partition("=")
    if not name or "/" not in name or not eq or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--ib-resource {text!r}: use <vendor>/<resource>=<count>, e.g. rdma/ib=1 or "
                         "nvidia.com/hostdev=8 (what the cluster's RDMA device plugin advertises)")
    return name, count


@dataclass
class K8sRequest:
    """Everything ``largessl launch k8s`` needs to render the manifests."""

    config: list[str]
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    image: str = "largessl:latest"
    namespace: str = "default"
    name: str = ""
    """Job name; default from train.run_dir."""
    gpus_per_node: int = 0
    """GPUs per pod, one process each; 0 = CPU pods with ``procs_per_node`` processes."""
    procs_per_node: int = 1
    cpu: str | None = None
    """CPU request and limit per pod (e.g. "32"); None = (data.num_workers + 1) per process."""
    memory: str | None = None
    """Memory request and limit per pod (e.g. "200Gi"); None = 24Gi per GPU (4Gi per CPU process) plus /dev/shm."""
    shm_size: str = "16Gi"
    """/dev/shm size (a memory-backed emptyDir): DataLoader workers pass batches through it."""
    pvc: str | None = None
    """PersistentVolumeClaim mounted at /mnt/runs holding the run directory (resume after restarts)."""
    data_pvc: str | None = None
    """PersistentVolumeClaim holding the dataset, mounted read-only at ``data_mount`` (manifests as paths there)."""
    data_mount: str = DATA_MOUNT
    s3_secret: str = "largessl-s3"
    """Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_ENDPOINT_URL) for s3:// paths."""
    port: int = DEFAULT_PORT
    grace_seconds: int = 600
    """terminationGracePeriodSeconds: time between SIGTERM and SIGKILL for the final checkpoint."""
    backoff_limit: int = 6
    """Failures of the job (a pod lost, a storage error; disruptions and requeue exits excluded) before it fails.
    The Job's ``backoffLimit`` is this times the pod count (:func:`job_backoff_limit`)."""
    service_account: str | None = None
    run_as_user: int = 1000
    """UID (and GID, and fsGroup of mounted volumes) of the container: the image's ``largessl`` user."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """nodeSelector of every pod (e.g. a GPU product label)."""
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    """Pod tolerations (e.g. of the GPU nodes' taint)."""
    priority_class: str | None = None
    """priorityClassName of every pod (preemption order on a shared cluster)."""
    kueue_queue: str | None = None
    """Kueue LocalQueue: the Jobs are created suspended with the queue label; Kueue admits each Job's pods all at
    once (gang scheduling with the cluster's waitForPodsReady)."""
    ib_resources: list[str] = field(default_factory=list)
    """RDMA/InfiniBand: extended resources per pod (``rdma/ib=1``); adds the IPC_LOCK capability ibverbs needs to
    pin memory."""
    offline: bool = False
    """Skip the submit-time checks that read manifests or write object storage from this machine."""
    pretrain_flags: list[str] = field(default_factory=list)
    """Flags of ``largessl pretrain`` (``--allow-change KEY``, ``--restart-from-scratch``)."""
    wait_poll_seconds: int = 60
    """How often a stage Job's init container looks for the pretraining's completion marker."""
    stages_in_pod: bool = False
    """Run the config's stages in the pretraining pod after pretraining (a sweep member) instead of as Jobs."""

    @property
    def nproc_per_node(self) -> int:
        """Processes per pod: one per GPU, else ``procs_per_node``."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.procs_per_node

    def validate(self) -> None:
        """Check the request's own values."""
        if self.nodes < 1 or self.procs_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError("--nodes and --procs-per-node must be >= 1 and --gpus-per-node >= 0")
        if not self.image or not _IMAGE.match(self.image):
            raise ValueError(f"--image {self.image!r} is not an image reference (registry/name:tag); pass the largessl "
                             "container image, see docker/README.md")
        if self.grace_seconds < 30:
            raise ValueError("--grace-seconds must leave time for the final checkpoint (>= 30)")
        if self.run_as_user < 1:
            raise ValueError(f"run_as_user={self.run_as_user}: the pods run as a non-root user (UID >= 1)")
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory), ("--shm-size", self.shm_size)):
            if value is not None and not _QUANTITY.match(str(value)):
                raise ValueError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 32, 500m, 200Gi)")
        for flag, claim in (("--pvc", self.pvc), ("--data-pvc", self.data_pvc)):
            if claim is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", claim):
                raise ValueError(f"{flag} {claim!r} is not a PersistentVolumeClaim name (lowercase, digits, '-', '.')")
        if not self.data_mount.startswith("/") or self.data_mount.rstrip("/") in ("", RUNS_MOUNT, CONFIG_DIR):
            raise ValueError(f"--data-mount {self.data_mount!r} must be an absolute path other than {RUNS_MOUNT} and "
                             f"{CONFIG_DIR}")
        for r in self.ib_resources:
            parse_resource(r)
        if self.wait_poll_seconds < 1:
            raise ValueError("the stage gate's poll interval must be >= 1 s")


def _gib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", quantity)
    if not m:
        raise ValueError(f"--shm-size {quantity!r}: use a binary quantity such as 16Gi or 512Mi")
    return float(m.group(1)) * {None: 2**-30, "Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 1024}[m.group(2)]


def default_cpu(req: K8sRequest, num_workers: int, nproc: int) -> str:
    """CPU per pod: (data.num_workers + 1) per process, at least 1."""
    return str(max(1, nproc * (num_workers * CPU_PER_WORKER + 1)))


def default_memory(req: K8sRequest, nproc: int, gpus: int) -> str:
    """Memory per pod: 24Gi per GPU process (4Gi per CPU process) plus the /dev/shm size."""
    per = MEMORY_GIB_PER_GPU if gpus else MEMORY_GIB_PER_CPU_PROCESS
    return f"{int(round(nproc * per + _gib(req.shm_size)))}Gi"


@dataclass
class K8sPlan:
    """Resolved names, config and manifests."""

    name: str
    service: str
    cfg: Config
    run_dir: str
    pretrain: list[dict[str, Any]]
    """ConfigMap, headless Service, Indexed Job."""
    stages: list[dict[str, Any]]
    """Follow-up Jobs (apply after the pretraining Job completed)."""


def config_delta(cfg: Config) -> dict[str, Any]:
    """Only the values that differ from the defaults (of the same method), as a config file holds them."""
    defaults = config_to_dict(load_config([], [f"method.name={cfg.method.name}"]))

    def diff(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in value.items():
            d = default.get(k)
            if isinstance(v, dict) and isinstance(d, dict):
                sub = diff(v, d)
                if sub:
                    out[k] = sub
            elif v != d:
                out[k] = v
        return out

    delta = diff(config_to_dict(cfg), defaults)
    delta.setdefault("method", {})["name"] = cfg.method.name
    return delta


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as readable literal blocks; no YAML anchors (an object
    used twice, e.g. a mount of the init container, is written out twice, as kubectl users read it)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _uses_s3(cfg: Config) -> bool:
    text = config_to_yaml(cfg)
    return "s3://" in text


def _run_dir(cfg: Config, req: K8sRequest) -> str:
    run_dir = cfg.train.run_dir
    if req.pvc:
        if req.nodes > 1 and "://" not in cfg.checkpoint.dir:
            log.warning("%d pods share the run directory on PVC %s: it must be ReadWriteMany (NFS, CephFS, EFS, "
                        "Filestore...); with a ReadWriteOnce claim set checkpoint.dir=s3://bucket/prefix",
                        req.nodes, req.pvc)
        if run_dir.startswith("/"):
            if not run_dir.startswith(RUNS_MOUNT + "/"):
                raise ValueError(f"train.run_dir={run_dir} is outside the PVC mounted at {RUNS_MOUNT}; use a "
                                 f"relative run_dir or one under {RUNS_MOUNT}/")
            return run_dir
        return f"{RUNS_MOUNT}/{run_dir.strip('/')}"
    if "://" in cfg.checkpoint.dir:
        log.warning("no --pvc: train.run_dir=%s is pod-local (metrics.jsonl and TensorBoard files are lost when "
                    "a pod is replaced); checkpoints go to %s and survive", run_dir, cfg.checkpoint.dir)
        return run_dir if run_dir.startswith("/") else f"/tmp/largessl/{run_dir.strip('/')}"
    raise ValueError("a replaced pod would start from scratch: pass --pvc CLAIM (run directory on a volume) or "
                     "set checkpoint.dir=s3://bucket/prefix (checkpoints on object storage)")


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
"""Container hardening (RDMA/InfiniBand setups that need IPC_LOCK add it back in an overlay)."""


def pod_security(uid: int) -> dict[str, Any]:
    """Pod securityContext: non-root ``uid``, volumes group-owned by it (``fsGroup``), default seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        # chown a large volume only when its root does not match yet, not at every pod start
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def job_backoff_limit(failures: int, pods: int) -> int:
    """The Job's ``backoffLimit`` for a job that should survive ``failures`` failures of any one pod.

    Kubernetes counts failed *pods*: when one pod of a distributed job dies (137 for a kill, 3 for storage), each
    of its ``pods - 1`` peers also ends, with 3 (a dead peer), and each counts. A plain ``backoffLimit: 6`` would
    fail a 16-pod job at its first lost pod; ``failures * pods`` keeps the budget per event whatever the size.
    """
    return failures * max(1, pods)


def pretrain_failure_policy() -> dict[str, Any]:
    """podFailurePolicy of the pretraining Job (first matching rule wins)."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": sorted(exit_codes.RETRY_FREE)}},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": sorted(exit_codes.FAIL_FAST)}},
    ]}


def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "largessl", "app.kubernetes.io/component": component, LABEL: name}


def _resources(req: K8sRequest, gpus: int, nproc: int, num_workers: int) -> dict[str, dict[str, str]]:
    """Requests == limits for CPU, memory, GPUs and RDMA devices (Guaranteed QoS: evicted last, never throttled
    below its request); the memory includes the /dev/shm emptyDir, which is charged to the pod."""
    cpu = req.cpu or default_cpu(req, num_workers, nproc)
    memory = req.memory or default_memory(req, nproc, gpus)
    amounts: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    for r in req.ib_resources:
        name, count = parse_resource(r)
        amounts[name] = count
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security(req: K8sRequest) -> dict[str, Any]:
    sec = {**CONTAINER_SECURITY, "capabilities": {"drop": ["ALL"]}}
    if req.ib_resources:
        # ibverbs pins (locks) the memory it registers with the HCA; without IPC_LOCK RLIMIT_MEMLOCK stops it
        sec["capabilities"] = {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    return sec


def _pod_spec(req: K8sRequest, name: str, args: list[str], env: list[dict[str, Any]], gpus: int,
              uses_s3: bool, nproc: int = 1, num_workers: int = 0,
              init: dict[str, Any] | None = None) -> dict[str, Any]:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": req.shm_size}},
    ]
    if req.pvc:
        mounts.append({"name": "runs", "mountPath": RUNS_MOUNT})
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": req.pvc}})
    if req.data_pvc:
        mounts.append({"name": "data", "mountPath": req.data_mount, "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": req.data_pvc, "readOnly": True}})
    env_from = [{"secretRef": {"name": req.s3_secret, "optional": not uses_s3}}]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": req.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        # optional unless the config reads or writes s3:// paths
        "envFrom": env_from,
        "resources": _resources(req, gpus, nproc, num_workers),
        "volumeMounts": mounts,
        "securityContext": _container_security(req),
        # `kubectl describe pod` shows the last log lines: the CLI's one-line error is the last one
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": req.grace_seconds,
        "securityContext": pod_security(req.run_as_user),
        "containers": [container],
        "volumes": volumes,
    }
    if init is not None:
        spec["initContainers"] = [{
            **init, "image": req.image, "imagePullPolicy": "IfNotPresent", "envFrom": env_from,
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            # equal requests and limits keep the pod's QoS class Guaranteed
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "100m", "memory": "256Mi"}},
            "volumeMounts": [m for m in mounts if m["name"] == "runs"],
            "securityContext": {**CONTAINER_SECURITY, "capabilities": {"drop": ["ALL"]}},
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }]
    if req.service_account:
        spec["serviceAccountName"] = req.service_account
    if req.node_selector:
        spec["nodeSelector"] = dict(req.node_selector)
    if req.tolerations:
        spec["tolerations"] = [dict(t) for t in req.tolerations]
    if req.priority_class:
        spec["priorityClassName"] = req.priority_class
    return spec


def _job_metadata(req: K8sRequest, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta_labels = dict(labels)
    if req.kueue_queue:
        meta_labels[KUEUE_QUEUE_LABEL] = req.kueue_queue
    return {"name": name, "namespace": req.namespace, "labels": meta_labels}


def pretrain_args(nproc_per_node: int, flags: list[str] | None = None) -> list[str]:
    """Container args (the image's entrypoint is ``largessl``) for one pod of the pretraining Job."""
    pretrain = ["pretrain", "--config", CONFIG_PATH, *(flags or [])]
    if nproc_per_node == 1:
        return pretrain
    return ["launch", "node", "--nproc-per-node", str(nproc_per_node), "--", *pretrain]


def plan_manifests(req: K8sRequest) -> K8sPlan:
    """Resolve the config and render the pretraining manifests and the stage Jobs."""
    req.validate()
    cfg = load_config([str(Path(c)) for c in req.config], req.overrides)
    if not cfg.train.run_dir:
        # derived once, here: it lands in the ConfigMap, so every pod and every replacement finds the same run
        cfg.train.run_dir = unique_run_dir(cfg).removeprefix("runs/")
        log.warning("no train.run_dir given: the job runs in %s (a new run)", cfg.train.run_dir)
    name = dns_name(req.name or f"largessl-{Path(cfg.train.run_dir).name}")
    service = name
    run_dir = _run_dir(cfg, req)
    cfg.train.run_dir = run_dir
    from largessl.run.preflight import preflight

    # the run directory lives on the cluster's volume: only what this machine can see is checked
    preflight(cfg, req.nodes * req.nproc_per_node, data=not req.offline, storage=not req.offline,
              run_dir_here=False, what=f"the Kubernetes job ({req.nodes} pod(s) x {req.nproc_per_node} process(es))")
    stage_names = [] if req.stages_in_pod else list(cfg.stages)
    stage_resources = {n: cfg.stage_config(n) for n in stage_names}
    stage_cmds: list[list[str]] = []
    if stage_names:
        from largessl.stages import stage_commands

        stage_cmds = stage_commands(cfg, run_dir, executable=["largessl"])
    gate = stage_gate(cfg, run_dir, req.wait_poll_seconds)
    if not req.stages_in_pod:
        cfg.stages = []  # stages run as their own Jobs after pretraining, not inside every pretraining pod
    uses_s3 = _uses_s3(cfg)
    ns = req.namespace
    nproc = req.nproc_per_node
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": ns, "labels": _labels(name, "config")},
        "data": {"config.yaml": yaml.safe_dump(config_delta(cfg), sort_keys=False)},
    }
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service, "namespace": ns, "labels": _labels(name, "rendezvous")},
        "spec": {
            "clusterIP": "None",
            # DNS records before readiness: every pod must resolve node 0 while it starts up
            "publishNotReadyAddresses": True,
            "selector": {LABEL: name, "app.kubernetes.io/component": "pretrain"},
            "ports": [{"name": "rendezvous", "port": req.port, "targetPort": req.port}],
        },
    }
    env = [
        {"name": "JOB_COMPLETION_INDEX",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "LARGESSL_JOB_NAME", "value": name},
        {"name": "LARGESSL_MASTER_SERVICE", "value": service},
        {"name": "LARGESSL_WORLD_SIZE", "value": str(req.nodes * nproc)},
        {"name": "MASTER_PORT", "value": str(req.port)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    pod = _pod_spec(req, name, pretrain_args(nproc, req.pretrain_flags), env, req.gpus_per_node, uses_s3, nproc,
                    cfg.data.num_workers)
    pod["subdomain"] = service
    pod["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": req.port}]
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _job_metadata(req, name, _labels(name, "pretrain")),
        "spec": {
            **({"suspend": True} if req.kueue_queue else {}),
            "completionMode": "Indexed",
            "completions": req.nodes,
            "parallelism": req.nodes,
            "backoffLimit": job_backoff_limit(req.backoff_limit, req.nodes),
            # a replacement starts only once the old pod is gone, i.e. after its final checkpoint
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": pretrain_failure_policy(),
            "template": {"metadata": {"labels": _labels(name, "pretrain")}, "spec": pod},
        },
    }
    stages = []
    for stage, cmd in zip(stage_names, stage_cmds):
        stages += stage_manifests(req, name, stage, cmd[1:], stage_resources, uses_s3, gate, cfg.data.num_workers)
    return K8sPlan(name, service, cfg, run_dir, [configmap, svc, job], stages)


GATE_CONTAINER = "wait-for-pretraining"


def stage_gate(cfg: Config, run_dir: str, poll_s: int) -> dict[str, Any]:
    """The init container of every stage Job: ``largessl launch wait`` blocks until the pretraining run's
    completion marker exists where the stage reads the checkpoint (the run directory, or checkpoint.dir).

    Why an init container and not a JobSet with ``dependsOn``: it needs no CRD or controller beyond the Job API,
    validates against the core schemas, and works whether the stage Jobs are applied with the pretraining Job or
    later. Its cost: a waiting stage pod is scheduled, so it holds its GPUs while it waits; apply the stages when
    pretraining nears its end (``launchers/k8s_imagenet.sh`` applies them when the Job completes) unless idle GPUs
    are cheaper than a person waiting. Either way no stage can read a run that is not complete.
    """
    location = cfg.checkpoint.dir or run_dir
    args = ["launch", "wait", location, "--poll-seconds", str(poll_s)]
    endpoint = cfg.checkpoint.endpoint_url or cfg.data.endpoint_url
    if "://" in location and endpoint:
        args += ["--endpoint-url", endpoint]
    return {"name": GATE_CONTAINER, "args": args}


def _failure_policy() -> dict[str, Any]:
    # first matching rule wins: disruptions and the requeue exit (75: state saved on a stop request) are
    # retried without counting against backoffLimit; bug codes fail the Job at once
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                             "values": [exit_codes.REQUEUE]}},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": sorted(exit_codes.FAIL_FAST)}},
    ]}


def stage_manifests(req: K8sRequest, name: str, stage: str, args: list[str], resources: dict[str, Any],
                    uses_s3: bool, gate: dict[str, Any] | None = None, num_workers: int = 0) -> list[dict[str, Any]]:
    """The Job (and, for several nodes, its headless Service) of one stage, sized by ``stages.<stage>``.

    Evaluation stages get ``nodes`` pods x ``gpus_per_node`` GPUs (default: 1 node x the pretraining pods'
    GPUs), one process per GPU through ``largessl launch node``, and the pretraining Job's restart rules:
    an Indexed Job whose pods are replaced after a disruption or a requeue exit (75, neither counted against
    ``backoffLimit``) and resume from the stage's checkpoint on the run volume; bug exit codes fail it at once. ``push`` is one process without GPUs.
    Kubernetes has no time limit to request: ``stages.<stage>.time`` applies to SLURM only. ``gate`` is the init
    container that holds the stage until pretraining completed (:func:`stage_gate`).
    """
    sc = resources.get(stage)
    job_name = dns_name(f"{name}-{stage}", 56)  # pod hostnames <job>-<index> stay within 63 characters
    distributed = stage in EVAL_STAGES
    nodes = sc.nodes if (sc is not None and distributed) else 1
    if not distributed:
        gpus, nproc = 0, 1
    else:
        gpus = req.gpus_per_node if sc is None or sc.gpus_per_node is None else sc.gpus_per_node
        nproc = gpus if gpus > 0 else req.procs_per_node
    if nodes > 1 and req.pvc:
        log.warning("stage %s: %d pods write its checkpoints under the run directory on PVC %s, which must be "
                    "ReadWriteMany (NFS, CephFS, EFS, Filestore...)", stage, nodes, req.pvc)
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    out: list[dict[str, Any]] = []
    if nodes > 1 or nproc > 1:
        env = [
            {"name": "JOB_COMPLETION_INDEX",
             "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
            {"name": "LARGESSL_JOB_NAME", "value": job_name},
            {"name": "LARGESSL_MASTER_SERVICE", "value": job_name},
            {"name": "LARGESSL_WORLD_SIZE", "value": str(nodes * nproc)},
            {"name": "MASTER_PORT", "value": str(req.port)},
            *env,
        ]
        if nodes == 1:  # everything on one pod: rendezvous on the loopback, no Service needed
            env.insert(4, {"name": "MASTER_ADDR", "value": "127.0.0.1"})
    if nproc > 1:
        args = ["launch", "node", "--nproc-per-node", str(nproc), "--", *args]
    spec = _pod_spec(req, name, args, env, gpus, uses_s3, nproc, num_workers, init=gate)
    if nodes > 1:
        spec["subdomain"] = job_name
        spec["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": req.port}]
        out.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": job_name, "namespace": req.namespace, "labels": _labels(name, stage)},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {LABEL: name, "app.kubernetes.io/component": stage},
                     "ports": [{"name": "rendezvous", "port": req.port, "targetPort": req.port}]},
        })
    out.append({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _job_metadata(req, job_name, _labels(name, stage)),
        "spec": {
            **({"suspend": True} if req.kueue_queue else {}),
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": job_backoff_limit(req.backoff_limit, nodes) if distributed else 1,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": _failure_policy(),
            "template": {"metadata": {"labels": _labels(name, stage)}, "spec": spec},
        },
    })
    return out


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order written."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)


def pod_environment(job: dict[str, Any], index: int, secret_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables the Job's pod ``index`` gets from its manifest (the pod contract).

    Plain values are copied, the completion-index fieldRef becomes ``index`` (as the Job controller sets it)
    and ``envFrom`` secrets come from ``secret_env``. Any other reference raises: the contract must not
    depend on cluster state this function cannot see.
    """
    container = job["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = dict(secret_env or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        path = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        if path == f"metadata.annotations['{INDEX_ANNOTATION}']":
            env[item["name"]] = str(index)
        else:
            raise ValueError(f"pod env {item['name']} uses an unsupported reference: {item}")
    return env


def validate_manifests(manifests: list[dict[str, Any]], version: str) -> None:
    """Validate every manifest strictly against the bundled Kubernetes ``version`` schemas (ValueError)."""
    import kubernetes_validate

    for m in manifests:
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise ValueError(f"{m.get('kind')}/{m.get('metadata', {}).get('name')} is invalid for Kubernetes "
                             f"{version}: {e.message} at {'.'.join(map(str, e.path))}") from None


def apply(manifests: list[dict[str, Any]]) -> str:
    """``kubectl apply -f -`` the manifests; returns kubectl's output."""
    if shutil.which("kubectl") is None:
        raise RuntimeError("kubectl is not on PATH; install it or drop --apply and apply the printed YAML")
    res = subprocess.run(["kubectl", "apply", "-f", "-"], input=to_yaml(manifests), capture_output=True,
                         text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"kubectl apply failed: {res.stderr.strip()}")
    return res.stdout
