"""Submit pretraining to SLURM through submitit: one task per GPU (or per CPU process), requeue on preemption.

How a preemption or time-out flows (nothing is lost, nothing is repeated):

1. SLURM signals the job (``--signal=USR2@<delay>`` before the time limit, ``scancel --signal``, or SIGTERM
   on ``scontrol requeue``/preemption). Every task receives it.
2. The trainer runs in-process inside :class:`PretrainJob` (``largessl.cli.main(["pretrain", ...])``); its
   own handlers replace submitit's while training, the ranks agree at the next step boundary, save a
   checkpoint on all ranks and return ``exit_codes.REQUEUE``. submitit's handler alone would act on
   global rank 0 only and exit at once, before the other ranks saved; that is why the trainer owns
   the signal and :meth:`PretrainJob.checkpoint` stays trivial.
3. Global rank 0 then runs ``scontrol requeue <job>`` (a no-op error if SLURM is already requeueing the
   job) and every task exits with 75. The requeued job runs the same pickled callable again, and the
   trainer resumes from ``train.run_dir``.

Launch code never imports ``largessl.train``; the job calls the CLI.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission

from largessl.config import EVAL_STAGES, Config, load_config, unique_run_dir
from largessl.run import exit_codes

log = logging.getLogger(__name__)

DEFAULT_TIME_MIN = 24 * 60


def parse_time(text: str | int) -> int:
    """SLURM time strings ("90", "2:00:00", "1-12:00:00", "30:00") → whole minutes."""
    if isinstance(text, int):
        minutes = text
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
        if not m:
            raise ValueError(f"--time {text!r} is not a SLURM time; use minutes (90), H:MM:SS or D-HH:MM:SS")
        parts = [int(p) for p in m.group(2).split(":")]
        if m.group(1):  # days-hours[:minutes[:seconds]]
            hours, mins, secs = (parts + [0, 0])[:3]
        elif len(parts) == 3:  # hours:minutes:seconds
            hours, mins, secs = parts
        else:  # minutes[:seconds]
            hours, mins, secs = 0, parts[0], parts[1] if len(parts) == 2 else 0
        minutes = int(m.group(1) or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes < 1:
        raise ValueError(f"--time must be at least one minute (got {text!r})")
    return minutes


@dataclass
class SlurmRequest:
    """Everything ``largessl launch slurm`` needs to build the job."""

    config: list[str]
    """Config files (made absolute: the job may start in another directory)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted ``key=value`` overrides passed to ``largessl pretrain``."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; one task per GPU. 0 = a CPU cluster (``tasks_per_node`` processes per node)."""
    tasks_per_node: int = 1
    """Processes per node on CPU clusters (ignored when gpus_per_node > 0)."""
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    job_name: str = "largessl"
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends USR2 (time for the final checkpoint)."""
    log_dir: str | None = None
    """submitit folder (pickles, logs); default ``<run_dir>/slurm``. Must be on a shared filesystem."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before srun (module load, conda activate, ...)."""
    submit_stages: bool = True
    """Submit the config's ``stages`` as afterok-dependent jobs (and drop them from the pretrain job)."""
    offline: bool = False
    """Skip the submit-time checks that read the manifests or write the run/checkpoint storage (this machine cannot
    reach them); the config, the batch against the world size and the stages' inputs are still checked."""
    pretrain_flags: list[str] = field(default_factory=list)
    """Flags of ``largessl pretrain`` for every run of the job (``--allow-change KEY``, ``--restart-from-scratch``)."""

    def validate(self) -> None:
        """Check the request's own values."""
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1 (got {self.nodes})")
        if self.gpus_per_node < 0 or self.tasks_per_node < 1:
            raise ValueError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError("--cpus-per-task must be >= 1")

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU, else the requested number of CPU processes."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


@dataclass
class SlurmPlan:
    """The resolved job: config, command lines, submitit parameters and folder."""

    request: SlurmRequest
    cfg: Config
    run_dir: Path
    folder: Path
    pretrain_argv: list[str]
    """Arguments for ``largessl.cli.main`` inside each task."""
    stage_commands: list[list[str]]
    parameters: dict[str, Any]
    """Native SlurmExecutor parameters (sbatch options and script parts)."""
    stage_names: list[str] = field(default_factory=list)
    stage_argv: list[list[str]] = field(default_factory=list)
    """Arguments for ``largessl.cli.main`` of each stage (its command without the executable)."""


def _abs_overrides(overrides: list[str], key: str, value: str) -> list[str]:
    return [o for o in overrides if not o.startswith(key + "=")] + [f"{key}={value}"]


def plan_job(request: SlurmRequest) -> SlurmPlan:
    """Resolve the config and check everything that can fail before the queue (``largessl.run.preflight``: bad
    keys, the batch against the world size, manifests, the stages' val set, write access), then derive every part
    of the job. Without ``train.run_dir`` a unique one is derived here, so every requeue finds the same run."""
    request.validate()
    config = [str(Path(c).resolve()) for c in request.config]
    cfg = load_config(config, request.overrides)
    if "://" in cfg.train.run_dir:
        raise ValueError(f"train.run_dir={cfg.train.run_dir!r} must be a path on the cluster's shared filesystem "
                         "(put checkpoints on object storage with checkpoint.dir=s3://... instead)")
    if not cfg.train.run_dir:
        cfg.train.run_dir = unique_run_dir(cfg)
        log.warning("no train.run_dir given: the job runs in %s (a new run)", Path(cfg.train.run_dir).resolve())
    run_dir = Path(cfg.train.run_dir).resolve()
    cfg.train.run_dir = str(run_dir)
    from largessl.run.preflight import preflight

    world = request.nodes * request.ntasks_per_node
    preflight(cfg, world, data=not request.offline, storage=not request.offline,
              what=f"the SLURM job ({request.nodes} node(s) x {request.ntasks_per_node} task(s))")
    overrides = _abs_overrides(list(request.overrides), "train.run_dir", str(run_dir))
    stages: list[list[str]] = []
    stage_argv: list[list[str]] = []
    if request.submit_stages and cfg.stages:
        from largessl.stages import stage_commands

        stages = stage_commands(cfg, run_dir)
        stage_argv = stage_commands(cfg, run_dir, executable=[])
        # the stages become their own dependent jobs; the pretrain job must not also run them in-process
        overrides = _abs_overrides(overrides, "stages", "[]")
    folder = Path(request.log_dir).resolve() if request.log_dir else run_dir / "slurm"
    argv = ["pretrain", *[a for c in config for a in ("--config", c)], *request.pretrain_flags, *overrides]
    plan = SlurmPlan(request, cfg, run_dir, folder, argv, stages, slurm_parameters(request),
                     list(cfg.stages) if stages else [], stage_argv)
    for name in plan.stage_names:
        stage_parameters(plan, name, "afterok:0")  # bad stage resources fail before anything is submitted
    return plan


def slurm_parameters(request: SlurmRequest) -> dict[str, Any]:
    """SlurmExecutor parameters for the pretraining job (names as in submitit's sbatch builder)."""
    params: dict[str, Any] = {
        "job_name": request.job_name,
        "nodes": request.nodes,
        "ntasks_per_node": request.ntasks_per_node,
        "time": request.time_min,
        "signal_delay_s": request.signal_delay_s,
        # requeueable even where the site default is --no-requeue; chdir so relative data paths resolve
        "additional_parameters": {"requeue": True, "chdir": os.getcwd()},
    }
    if request.gpus_per_node:
        params["gpus_per_node"] = request.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos"):
        value = getattr(request, key)
        if value is not None:
            params[key] = value
    if request.mem_gb is not None:
        params["mem"] = f"{int(request.mem_gb)}GB" if request.mem_gb == int(request.mem_gb) \
            else f"{int(request.mem_gb * 1024)}MB"
    setup = list(request.setup)
    # one process per core budget: without this every task's torch would use all cores of the node
    setup.append(f"export OMP_NUM_THREADS={request.cpus_per_task or 1}")
    params["setup"] = setup
    return params


def stage_parameters(plan: SlurmPlan, name: str, dependency: str) -> dict[str, Any]:
    """SlurmExecutor parameters of stage ``name``'s job: ``stages.<name>`` resources, requeueable, after ``dependency``.

    Evaluation stages default to 1 node x the pretraining job's GPUs per node (one task per GPU) and its
    time limit; ``push`` is one task without GPUs.
    """
    sc = plan.cfg.stage_config(name)
    req = plan.request
    params = dict(plan.parameters, job_name=f"{req.job_name}-{name}", dependency=dependency,
                  additional_parameters=dict(plan.parameters["additional_parameters"], **{"kill-on-invalid-dep": "yes"}))
    params.pop("gpus_per_node", None)
    if name not in EVAL_STAGES:
        params.update(nodes=1, ntasks_per_node=1)
        return params
    gpus = req.gpus_per_node if sc.gpus_per_node is None else sc.gpus_per_node
    params.update(nodes=sc.nodes, ntasks_per_node=gpus if gpus > 0 else req.tasks_per_node)
    if gpus:
        params["gpus_per_node"] = gpus
    if sc.time:
        try:
            params["time"] = parse_time(sc.time)
        except ValueError as e:
            raise ValueError(f"stages.{name}.time: {e}") from None
    return params


def render_stage_sbatch(plan: SlurmPlan, index: int, dependency: str = "afterok:<previous job>") -> str:
    """The sbatch script of the ``index``-th stage's job (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = stage_parameters(plan, plan.stage_names[index], dependency)
    return _make_sbatch_string(command=_submit_command(plan.folder), folder=plan.folder / "%j", **params)


def _submit_command(folder: Path, python: str | None = None) -> str:
    # the command submitit's SlurmExecutor puts after srun (kept identical so --dry-run shows the real script)
    return " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit",
                     shlex.quote(str(folder / "%j"))])


def render_sbatch(plan: SlurmPlan) -> str:
    """The sbatch script submitit will submit for the pretraining job (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=_submit_command(plan.folder), folder=plan.folder / "%j", **plan.parameters)


class PretrainJob(submitit.helpers.Checkpointable):
    """The callable each SLURM task runs: export the torch.distributed env, then ``largessl pretrain``."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        """Train (resuming); on a stop request requeue the job from global rank 0 and exit 75; any other failure
        ends the task with the trainer's exit code."""
        # set_cuda_visible_devices=False: every task sees the node's GPUs and the trainer picks
        # cuda:LOCAL_RANK (the torchrun convention); hiding all but one GPU would break ranks > 0.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                    overwrite=True)
        from largessl.cli import main

        code = main(self.argv)
        if code == exit_codes.OK:
            return code
        if code == exit_codes.REQUEUE:
            if env.rank == 0:
                requeue_self()
            # SystemExit is not an Exception: submitit writes no result, so the requeued run starts afresh
            raise SystemExit(code)
        log.error("largessl %s exited with code %d%s", " ".join(self.argv[:1]), code,
                  " (do not requeue: a bug or bad input)" if code in exit_codes.FAIL_FAST else "")
        # The task ends with the trainer's code (srun, sacct and the operator see 3 for a lost peer, 2 for bad
        # input); an exception would make submitit end every failed task with 1.
        raise SystemExit(code)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Resubmit unchanged: the trainer already saved and resumes from ``train.run_dir``."""
        return DelayedSubmission(self, *args, **kwargs)


def requeue_self() -> None:
    """``scontrol requeue $SLURM_JOB_ID``; tolerated to fail when SLURM is already requeueing the job."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job:
        raise RuntimeError("the trainer asked for a requeue but SLURM_JOB_ID is not set (not inside a SLURM job)")
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if res.returncode:
        # after `scontrol requeue` or a preemption SLURM is already requeueing the job: nothing to do
        log.warning("scontrol requeue %s: %s (the job is probably already being requeued)", job,
                    res.stderr.strip())
    else:
        log.info("requeued SLURM job %s; it resumes from the last checkpoint", job)


class EvalStageJob(PretrainJob):
    """An evaluation stage (linear, knn, finetune) on every task of its own SLURM job, requeued like pretraining.

    Each task runs ``largessl eval <stage> ...`` in-process with torch.distributed's variables; on a stop
    signal the stage saves its state and exits 75, global rank 0 requeues the job, and the requeued job
    resumes the stage (same job id, so the dependent stages keep waiting).
    """


class StageJob:
    """A single-process downstream stage (push) run as its own SLURM job after the previous one succeeded."""

    def __init__(self, command: list[str]) -> None:
        self.command = list(command)

    def __call__(self) -> int:
        """Run the stage's command line; a non-zero exit fails the job (and its dependents)."""
        code = subprocess.run(self.command, check=False).returncode
        if code:
            raise RuntimeError(f"stage command exited with {code}: {shlex.join(self.command)}")
        return code


@dataclass
class Submitted:
    """What was submitted: ids and where to look."""

    job_id: str
    stdout: Path
    stderr: Path
    folder: Path
    run_dir: Path
    stage_job_ids: list[str]


def _executor(folder: Path, params: dict[str, Any]) -> submitit.AutoExecutor:
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: run `largessl launch slurm` on a SLURM login node "
                           "(or use --dry-run to see the script)")
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    return ex


def submit(plan: SlurmPlan) -> Submitted:
    """Submit the pretraining job (and its stages as afterok dependents, each sized by ``stages.<name>``)."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    ex = _executor(plan.folder, plan.parameters)
    # submitting from inside another job must not leak that job's SLURM_*/RANK variables into this one
    with submitit.helpers.clean_env():
        job = ex.submit(PretrainJob(plan.pretrain_argv))
        stage_ids = []
        previous = job.job_id
        for name, cmd, argv in zip(plan.stage_names, plan.stage_commands, plan.stage_argv):
            params = stage_parameters(plan, name, f"afterok:{previous}")
            runner = EvalStageJob(argv) if name in EVAL_STAGES else StageJob(cmd)
            stage = _executor(plan.folder, params).submit(runner)
            stage_ids.append(stage.job_id)
            previous = stage.job_id  # stages run in order: push only after the evaluations passed
    return Submitted(job.job_id, job.paths.stdout, job.paths.stderr, plan.folder, plan.run_dir, stage_ids)


def job_state(job_id: str) -> str:
    """The job's state from ``scontrol`` (no accounting database needed, unlike submitit's sacct poll)."""
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise RuntimeError(f"scontrol show job {job_id} failed: {res.stderr.strip()}")
    m = re.search(r"\bJobState=(\S+)", res.stdout)
    return m.group(1) if m else "UNKNOWN"
