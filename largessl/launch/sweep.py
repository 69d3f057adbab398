"""Sweeps: one config, a grid of overrides (and seeds), one job array; every member is an ordinary run.

A sweep lives in one directory::

    <sweep_dir>/sweep.json       what was asked (config, overrides, grid, seeds), its members and the job
    <sweep_dir>/<NNN>-<values>/  each member's run directory (train.run_dir): checkpoints, metrics, eval/
    <sweep_dir>/slurm/           submitit's folder (SLURM)
    <sweep_dir>/sweep.png        written by ``largessl sweep status``

Member ``i`` is the config with the base overrides, then its grid values, then
``train.run_dir=<sweep_dir>/<name>``. It runs ``largessl pretrain`` (and the config's ``stages`` in the same job),
so it is requeued and resumed exactly like a single run. On SLURM the members are the tasks of one job array
(``--array=0-N%parallel``); on Kubernetes they are the completion indexes of one Indexed Job whose pods run
``largessl sweep member``, which picks the member's overrides by ``JOB_COMPLETION_INDEX``; locally they run one
after another.

Submitting the same sweep again (same config, overrides and grid) is allowed and resumes its members; a different
sweep in the same directory, or a second submission while the first job array is still queued or running, is
refused before anything is submitted.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from largessl.config import load_config, parse_override
from largessl.run.durable import write_json_atomic

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SEED_KEY = "train.seed"
_ACTIVE_SLURM = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING")


@dataclass
class Axis:
    """One swept key and its values (as written on the command line; the config parses them as YAML)."""

    key: str
    values: list[str]


@dataclass
class Member:
    """One run of the sweep."""

    index: int
    name: str
    values: dict[str, str]
    """The grid values of this member, key → value text."""
    run_dir: str

    @property
    def overrides(self) -> list[str]:
        """The member's own overrides (its grid values and its run directory), applied after the base ones."""
        return [*(f"{k}={v}" for k, v in self.values.items()), f"train.run_dir={self.run_dir}"]


@dataclass
class Sweep:
    """What ``sweep.json`` holds."""

    dir: str
    config: list[str]
    overrides: list[str]
    axes: list[Axis]
    seeds: int
    members: list[Member]
    target: str = ""
    job: dict[str, Any] = field(default_factory=dict)
    """Where it was submitted: ``{"slurm_job_id": "123", "tasks": ["123_0", ...]}`` or ``{"k8s_job": name}``."""
    created_at: float = 0.0

    def same_request(self, other: Sweep) -> bool:
        """True when ``other`` asks for the same runs (so submitting it again resumes them)."""
        return (self.config, self.overrides, [asdict(a) for a in self.axes], self.seeds,
                [asdict(m) for m in self.members]) == (other.config, other.overrides, [asdict(a) for a in other.axes],
                                                      other.seeds, [asdict(m) for m in other.members])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def split_values(text: str) -> list[str]:
    """``"1e-3,5e-3"`` → ``["1e-3", "5e-3"]``; commas inside brackets, braces or quotes do not split
    (``"[64,64],[128,128]"`` is two values)."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(specs: list[str]) -> list[Axis]:
    """``--grid KEY=V1,V2,...`` options → axes, in order. Errors name the option."""
    axes: list[Axis] = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--grid {spec!r} must look like section.key=value1,value2 (e.g. method.lambd=1e-3,5e-3)")
        key, raw = spec.split("=", 1)
        key = key.strip()
        parse_override(f"{key}=0")  # the key's own shape
        values = split_values(raw)
        if not values or any(v == "" for v in values):
            raise ValueError(f"--grid {spec!r} has an empty value")
        if len(set(values)) != len(values):
            raise ValueError(f"--grid {spec!r} names a value twice")
        if key == "train.run_dir":
            raise ValueError("--grid train.run_dir: every member gets its own run directory under the sweep's")
        if any(a.key == key for a in axes):
            raise ValueError(f"--grid {key} is given twice; put all its values in one --grid {key}=a,b,c")
        axes.append(Axis(key, values))
    if not axes:
        raise ValueError("a sweep needs at least one --grid KEY=V1,V2,...")
    return axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def expand(axes: list[Axis], seeds: int, base_dir: str) -> list[Member]:
    """Every combination of the axes' values (the last axis varies fastest), times ``seeds`` values of
    ``train.seed`` (0..seeds-1, the fastest of all) when ``seeds`` > 1."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (got {seeds})")
    axes = list(axes)
    if seeds > 1:
        if any(a.key == SEED_KEY for a in axes):
            raise ValueError(f"--seeds {seeds} and --grid {SEED_KEY}=... both set the seed; use one of them")
        axes.append(Axis(SEED_KEY, [str(s) for s in range(seeds)]))
    short = _short_names([a.key for a in axes])
    members = []
    for i, combo in enumerate(itertools.product(*(a.values for a in axes))):
        values = {a.key: v for a, v in zip(axes, combo)}
        label = "-".join(f"{_slug(short[k])}={_slug(v)}" for k, v in values.items())
        name = f"{i:03d}-{label}"[:120]
        members.append(Member(i, name, values, f"{base_dir.rstrip('/')}/{name}"))
    return members


def plan_sweep(sweep_dir: str, config: list[str], overrides: list[str], grid: list[str], seeds: int = 1,
               target: str = "", member_base: str | None = None) -> Sweep:
    """Resolve the grid into members and load every member's config (a bad key or value fails here, naming the
    member, before anything is written or submitted). ``member_base``: the run directories' parent as the jobs
    see it (default: ``sweep_dir``)."""
    if not sweep_dir:
        raise ValueError("name the sweep's directory with --dir (each member's run directory goes below it)")
    if "://" in sweep_dir:
        raise ValueError(f"--dir {sweep_dir}: the sweep directory is a path on the shared filesystem "
                         "(put checkpoints on object storage with checkpoint.dir=s3://... if needed)")
    axes = parse_grid(grid)
    for o in overrides:
        key = parse_override(o)[0]
        if key == "train.run_dir":
            raise ValueError(f"override {o!r}: each member's run directory is <sweep dir>/<member>; drop it")
        if any(a.key == key for a in axes):
            raise ValueError(f"{key} is both an override and a --grid axis; keep one of them")
        if key == SEED_KEY and seeds > 1:
            raise ValueError(f"override {o!r} and --seeds {seeds} both set the seed; use one of them")
    config = [str(Path(c).resolve()) for c in config]
    members = expand(axes, seeds, member_base or sweep_dir)
    for m in members:
        try:
            load_config(config, [*overrides, *m.overrides])
        except ValueError as e:
            raise ValueError(f"sweep member {m.name}: {e}") from None
    return Sweep(sweep_dir, config, list(overrides), axes, seeds, members, target, {}, time.time())


def sweep_path(sweep_dir: str | Path) -> Path:
    """``<sweep_dir>/sweep.json``."""
    return Path(sweep_dir) / SWEEP_FILE


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """Read ``sweep.json``; a missing or unreadable one is a ValueError naming it."""
    path = sweep_path(sweep_dir)
    if not path.is_file():
        raise ValueError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); `largessl sweep slurm|k8s|local` "
                         "writes one")
    try:
        d = json.loads(path.read_text())
        d["axes"] = [Axis(**a) for a in d["axes"]]
        d["members"] = [Member(**m) for m in d["members"]]
        return Sweep(**d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def active_slurm_tasks(sweep: Sweep) -> list[str]:
    """The recorded SLURM tasks of ``sweep`` that SLURM still holds queued or running."""
    from largessl.run.status import slurm_job

    active = []
    for task in sweep.job.get("tasks", []):
        info = slurm_job(task)
        if info is not None and info["state"].split()[0].rstrip("+") in _ACTIVE_SLURM:
            active.append(f"{task} {info['state']}")
    return active


def record(sweep: Sweep) -> Sweep:
    """Write ``sweep.json`` (atomically). A directory holding a different sweep, or this sweep still queued or
    running on SLURM, is refused (ValueError); the same sweep again keeps its record (its members resume)."""
    path = sweep_path(sweep.dir)
    if path.exists():
        old = load_sweep(sweep.dir)
        if not old.same_request(sweep):
            raise ValueError(f"{sweep.dir} already holds another sweep ({path}: other config, overrides, grid or "
                             "seeds); choose a new --dir, or repeat that sweep's own arguments to resume it")
        active = active_slurm_tasks(old)
        if active:
            raise ValueError(f"this sweep is still in the SLURM queue ({', '.join(active[:4])}"
                             f"{', ...' if len(active) > 4 else ''}): submitting it again would run its members "
                             "twice; wait for it or scancel it first")
        sweep.created_at = old.created_at
    Path(sweep.dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, sweep.to_dict())
    return sweep


# ---------------------------------------------------------------------------------------------------
# SLURM: one job array


def plan_slurm(sweep: Sweep, make_request: Any) -> list[Any]:
    """One :class:`~largessl.launch.slurm.SlurmPlan` per member (each checked like ``launch slurm``; the data
    and storage are read once, for the first member, unless the grid changes them). ``make_request(overrides)``
    builds the member's request."""
    from largessl.launch import slurm

    touches_io = any(a.key.startswith(("data.", "checkpoint.")) for a in sweep.axes)
    plans = []
    for m in sweep.members:
        req = make_request([*sweep.overrides, *m.overrides])
        req.submit_stages = False  # the stages run inside each member's job, after its pretraining
        req.log_dir = str(Path(sweep.dir).resolve() / "slurm")
        if m.index > 0 and not touches_io:
            req.offline = True
        plans.append(slurm.plan_job(req))
    return plans


def array_parameters(plans: list[Any], parallel: int) -> dict[str, Any]:
    """The job array's sbatch parameters: the members' (all equal), at most ``parallel`` members at once."""
    params = dict(plans[0].parameters)
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1 (got {parallel})")
    params["array_parallelism"] = min(parallel, len(plans))
    return params


def render_array_sbatch(plans: list[Any], parallel: int) -> str:
    """The job array's sbatch script (what ``sweep slurm --dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from largessl.launch.slurm import _submit_command

    folder = plans[0].folder
    return _make_sbatch_string(command=_submit_command(folder), folder=folder / "%j", map_count=len(plans),
                               **array_parameters(plans, parallel))


def submit_slurm(sweep: Sweep, plans: list[Any], parallel: int) -> Sweep:
    """Submit the members as one job array and record its task ids in ``sweep.json``."""
    import submitit

    from largessl.launch.slurm import PretrainJob, _executor

    folder = plans[0].folder
    folder.mkdir(parents=True, exist_ok=True)
    ex = _executor(folder, array_parameters(plans, parallel))
    with submitit.helpers.clean_env():
        with ex.batch():
            jobs = [ex.submit(PretrainJob(p.pretrain_argv)) for p in plans]
    tasks = [j.job_id for j in jobs]
    sweep.target = "slurm"
    sweep.job = {"slurm_job_id": tasks[0].split("_")[0], "tasks": tasks, "folder": str(folder),
                 "submitted_at": time.time()}
    write_json_atomic(sweep_path(sweep.dir), sweep.to_dict())
    return sweep


# ---------------------------------------------------------------------------------------------------
# Kubernetes: one Indexed Job, the completion index selects the member

MEMBERS_FILE = "members.json"
INDEX_ENV = "LARGESSL_SWEEP_INDEX"


def plan_k8s(sweep: Sweep, request: Any, parallel: int) -> list[dict[str, Any]]:
    """ConfigMap (the base config and ``members.json``) and one Indexed Job with a completion per member.

    Each index is retried on its own (``backoffLimitPerIndex``) and a member that fails for good (bad input,
    collapse) fails its index, not the sweep (``FailIndex``); pods evicted or stopped for a requeue are
    replaced and resume like a single run's.
    """
    from largessl.launch import k8s

    if request.nodes != 1:
        raise ValueError(f"--nodes {request.nodes}: a Kubernetes sweep runs each member in one pod (the Indexed "
                         "Job's index selects the member, not the node); sweep multi-node runs on SLURM")
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1 (got {parallel})")
    request.overrides = [*sweep.overrides, f"train.run_dir={sweep.dir}"]
    request.stages_in_pod = True
    if not request.name:
        request.name = f"sweep-{Path(sweep.dir).name}"
    plan = k8s.plan_manifests(request)
    configmap, _service, job = plan.pretrain
    members = [[*(f"{k}={v}" for k, v in m.values.items()), f"train.run_dir={plan.run_dir}/{m.name}"]
               for m in sweep.members]
    configmap["data"][MEMBERS_FILE] = json.dumps(members, indent=1)
    pod = job["spec"]["template"]["spec"]
    pod.pop("subdomain", None)
    container = pod["containers"][0]
    container.pop("ports", None)
    keep = {"PYTHONUNBUFFERED"}
    env = [e for e in container["env"] if e["name"] in keep]
    index_ref = next(e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    container["env"] = [{"name": INDEX_ENV, "valueFrom": index_ref["valueFrom"]}, *env]
    container["args"] = ["sweep", "member", "--members", f"{k8s.CONFIG_DIR}/{MEMBERS_FILE}", "--",
                         *container["args"]]
    spec = job["spec"]
    spec["completions"] = len(members)
    spec["parallelism"] = min(parallel, len(members))
    spec.pop("backoffLimit", None)
    spec["backoffLimitPerIndex"] = request.backoff_limit
    for rule in spec["podFailurePolicy"]["rules"]:
        if rule["action"] == "FailJob":
            rule["action"] = "FailIndex"
    job["metadata"]["labels"]["app.kubernetes.io/component"] = "sweep"
    job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "sweep"
    sweep.target = "k8s"
    sweep.job = {"k8s_job": job["metadata"]["name"], "namespace": request.namespace, "run_dir": plan.run_dir}
    return [configmap, job]


def run_member(members_file: str, argv: list[str], index: int | None = None,
               environ: dict[str, str] | None = None) -> int:
    """``largessl sweep member``: run ``argv`` (a ``largessl`` command line) with member ``index``'s overrides
    appended; the index defaults to ``LARGESSL_SWEEP_INDEX``, else ``JOB_COMPLETION_INDEX``, else
    ``SLURM_ARRAY_TASK_ID``."""
    import os

    env = os.environ if environ is None else environ
    if index is None:
        for var in (INDEX_ENV, "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
            if env.get(var, "").strip():
                try:
                    index = int(env[var])
                except ValueError:
                    raise ValueError(f"{var}={env[var]!r} is not a member index") from None
                break
        else:
            raise ValueError(f"no member index: pass --index N or set {INDEX_ENV}")
    try:
        members = json.loads(Path(members_file).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the sweep's members from {members_file}: {e}") from None
    if not isinstance(members, list) or not 0 <= index < len(members):
        raise ValueError(f"member index {index} is outside the {len(members)} member(s) of {members_file}")
    if not argv:
        raise ValueError("give the command to run after `--`, e.g. -- pretrain --config /etc/largessl/config.yaml")
    # one member is one single-node run: the Indexed Job's index is not a node rank here
    env.pop("JOB_COMPLETION_INDEX", None)
    env.pop("LARGESSL_WORLD_SIZE", None)
    from largessl.cli import main

    log.info("sweep member %d: %s", index, " ".join(members[index]))
    return main([*argv, *members[index]])


# ---------------------------------------------------------------------------------------------------
# Locally: one member after another


def run_local(sweep: Sweep, pretrain_flags: list[str] | None = None,
              python: str | None = None) -> dict[int, int]:
    """Run each member's ``largessl pretrain`` (and its stages) in turn; a finished member is skipped, a stopped
    or failed one is run again (it resumes). Returns each member's exit code; a failing member does not stop the
    others (one diverged learning rate should not cost the rest of the grid)."""
    from largessl.run.status import is_run_dir, run_status

    sweep.target = "local"
    write_json_atomic(sweep_path(sweep.dir), sweep.to_dict())
    codes: dict[int, int] = {}
    for m in sweep.members:
        if is_run_dir(Path(m.run_dir)) and run_status(m.run_dir, scheduler=False)["state"] == "finished":
            log.info("sweep member %s already finished", m.name)
            codes[m.index] = 0
            continue
        cmd = [python or sys.executable, "-m", "largessl", "pretrain",
               *[a for c in sweep.config for a in ("--config", c)], *(pretrain_flags or []), *sweep.overrides,
               *m.overrides]
        log.info("sweep member %d/%d: %s", m.index + 1, len(sweep.members), m.name)
        codes[m.index] = subprocess.run(cmd, check=False).returncode
        if codes[m.index]:
            log.warning("sweep member %s exited with %d; going on with the others", m.name, codes[m.index])
    return codes
