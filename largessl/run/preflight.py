"""Submit-time checks: everything about a run that can fail before the queue, checked before it is queued.

``largessl launch slurm|k8s`` and ``largessl config --check`` call :func:`preflight` on the resolved config and the
job's world size; ``largessl pretrain`` runs :func:`check_stage_inputs` before training when stages follow in the
same process. A problem is reported as ``ValueError`` (exit code 2) listing every problem found, each naming the
key and what is wrong; a storage server that keeps failing is ``RuntimeError`` (exit 3: retry later).

Checked: the config's types and ranges (by loading it), the global batch against the world size, the train
manifest (set, exists, parses, every shard there) and the plan it gives (samples for one batch, a method's own
bounds such as DBN's B - 1 >= G), a labelled val manifest of the same classes when evaluation stages follow, and
write access to the run directory and the checkpoint storage (a probe file, removed at once).

Why here, on the run-machinery floor: the launchers may not import ``largessl.data`` (docs/architecture.md), and
these checks need to parse manifests; the trainer's CLI uses the same functions, so a submit-time check and a
start-time check can never disagree.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from largessl.config import EVAL_STAGES, Config, plan_run
from largessl.data import io
from largessl.data.manifest import Manifest, read_manifest
from largessl.run.exit_codes import is_storage_error
from largessl.run.layout import CHECKPOINTS_DIR

log = logging.getLogger(__name__)


@dataclass
class PreflightReport:
    """What was checked (one line each) and what is wrong."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        """Record a passed check."""
        self.checked.append(line)

    def fail(self, line: str) -> None:
        """Record a problem."""
        self.problems.append(line)

    def raise_if_failed(self, what: str = "the job") -> None:
        """``ValueError`` listing every problem (exit code 2)."""
        if len(self.problems) == 1:
            raise ValueError(f"{what} would fail on the cluster: {self.problems[0]}")
        if self.problems:
            listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            raise ValueError(f"{what} would fail on the cluster, {len(self.problems)} problems: {listed}")


def eval_stages(cfg: Config) -> list[str]:
    """The configured stages that evaluate (need labelled manifests)."""
    return [s for s in cfg.stages if s in EVAL_STAGES]


def check_stage_inputs(cfg: Config, report: PreflightReport | None = None) -> None:
    """Evaluation stages need labelled train and val manifests: fail now, not when pretraining ends."""
    rep = report or PreflightReport()
    stages = eval_stages(cfg)
    if stages and not cfg.data.val_manifest:
        rep.fail(f"stages {stages} evaluate on a labelled val set but data.val_manifest is empty; set "
                 "data.val_manifest=.../val/manifest.json (written by `largessl shards write`) or drop those stages")
    elif stages:
        rep.ok(f"stages {stages}: val manifest {cfg.data.val_manifest}")
    if report is None:
        rep.raise_if_failed("the configured stages")


def check_world(cfg: Config, world_size: int, report: PreflightReport) -> None:
    """The global batch splits evenly over the job's ranks."""
    gbs = cfg.train.global_batch_size
    if world_size < 1:
        report.fail(f"the job has {world_size} processes; it needs at least one")
    elif gbs % world_size:
        lower, upper = gbs - gbs % world_size, gbs + world_size - gbs % world_size
        report.fail(f"train.global_batch_size={gbs} is not divisible by the job's {world_size} processes; use a "
                    f"multiple of {world_size} (e.g. {lower or upper} or {upper}) or another number of nodes/GPUs")
    else:
        report.ok(f"global batch {gbs} = {world_size} processes x {gbs // world_size}")


def _read(url: str, key: str, cfg: Config, report: PreflightReport) -> Manifest | None:
    try:
        m = read_manifest(url, io.storage_options_for(url, cfg.data.endpoint_url), check_shards=True,
                          retries=cfg.data.retries, backoff_s=cfg.data.retry_backoff_s)
    except ValueError as e:
        report.fail(f"{key}: {e}")
        return None
    except Exception as e:
        if io.is_transient(e) or not is_storage_error(e):
            raise  # a failing server (exit 3: retry later), or a bug
        report.fail(f"{key}: cannot read {url} from this machine ({type(e).__name__}: {e}); fix the path, endpoint or "
                    "credentials, or pass --offline when only the cluster can reach the data")
        return None
    report.ok(f"{key} {url}: {m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes, every "
              "shard present")
    return m


def check_data(cfg: Config, world_size: int, report: PreflightReport) -> None:
    """The manifests exist and parse, and give a plan (a batch's worth of samples, the method's bounds)."""
    if not cfg.data.train_manifest:
        report.fail("data.train_manifest is empty; point it at the manifest.json written by `largessl shards write`")
        return
    train = _read(cfg.data.train_manifest, "data.train_manifest", cfg, report)
    if train is not None and world_size >= 1 and cfg.train.global_batch_size % world_size == 0:
        try:
            plan = plan_run(cfg, world_size, train.num_samples)
            report.ok(f"plan: {plan.num_steps} steps of {plan.global_batch_size} ({plan.steps_per_epoch} per epoch), "
                      f"lr {plan.lr:.4g}")
        except ValueError as e:
            report.fail(str(e))
    stages = eval_stages(cfg)
    if stages and cfg.data.val_manifest:
        val = _read(cfg.data.val_manifest, "data.val_manifest", cfg, report)
        if train is not None and val is not None:
            if train.num_classes < 2:
                report.fail(f"stages {stages} need labels, but data.train_manifest has {train.num_classes} classes")
            elif val.class_names != train.class_names:
                report.fail(f"data.train_manifest and data.val_manifest disagree on the classes ({train.num_classes} "
                            f"vs {val.num_classes}); evaluation needs splits of one labelled dataset")


def check_writable(location: str, endpoint_url: str, key: str, report: PreflightReport) -> None:
    """Write and remove a probe file at ``location`` (a folder or an fsspec URL), creating the folder if needed."""
    probe = f".largessl-preflight-{secrets.token_hex(4)}"
    try:
        if io.protocol_of(location) == "file":
            folder = Path(io.strip_protocol(location))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / probe
            path.write_bytes(b"largessl preflight\n")
            path.unlink()
        else:
            url = f"{location.rstrip('/')}/{probe}"
            fs = io.filesystem(url, io.storage_options_for(url, endpoint_url))
            io.with_retries(lambda: fs.pipe_file(io.strip_protocol(url), b"largessl preflight\n"),
                            f"writing {url}", 3, 1.0)
            fs.rm(io.strip_protocol(url))
    except Exception as e:
        if io.is_transient(e):
            raise RuntimeError(f"cannot check write access to {location}: the server failed "
                               f"{io.describe_error(e)}; retry later") from e
        if not is_storage_error(e):
            raise
        report.fail(f"{key}: cannot write to {location} ({type(e).__name__}: {e}); fix the path or its permissions"
                    " (or the credentials of the object store)")
        return
    report.ok(f"{key}: {location} is writable")


def check_storage(cfg: Config, report: PreflightReport, run_dir_here: bool = True) -> None:
    """Write access to the run directory (when it is visible from here) and to the checkpoint storage."""
    ckpt = cfg.checkpoint.dir
    if run_dir_here and cfg.train.run_dir:
        check_writable(cfg.train.run_dir, "", "train.run_dir", report)
        if not ckpt:
            check_writable(os.path.join(cfg.train.run_dir, CHECKPOINTS_DIR), "", "checkpoints", report)
    if ckpt and (run_dir_here or "://" in ckpt):
        check_writable(ckpt, cfg.checkpoint.endpoint_url or cfg.data.endpoint_url, "checkpoint.dir", report)


def preflight(cfg: Config, world_size: int, *, data: bool = True, storage: bool = True,
              run_dir_here: bool = True, what: str = "the job") -> PreflightReport:
    """Every submit-time check; raises ``ValueError`` listing the problems, else returns what was checked.

    ``data``/``storage`` False skip the checks that read manifests or write storage (a machine that cannot reach
    them); ``run_dir_here`` False when the run directory lives on the cluster only (a Kubernetes volume).
    """
    report = PreflightReport()
    report.ok("config: keys, types and ranges")
    check_world(cfg, world_size, report)
    check_stage_inputs(cfg, report)
    if data:
        check_data(cfg, world_size, report)
    elif not cfg.data.train_manifest:
        report.fail("data.train_manifest is empty; point it at the manifest.json written by `largessl shards write`")
    if storage:
        check_storage(cfg, report, run_dir_here)
    report.raise_if_failed(what)
    for line in report.checked:
        log.info("check ok: %s", line)
    return report
