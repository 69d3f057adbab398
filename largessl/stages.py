"""Downstream stages that run after pretraining completes: ``stages: [linear, knn, finetune, push]``.

Locally the trainer calls :func:`run_stages` in-process on every rank once the final checkpoint is
saved. Launchers turn :func:`stage_commands` into dependent jobs instead (SLURM ``afterok``, Kubernetes
follow-up Jobs), each with the nodes, GPUs and time of ``stages.<name>`` (``Config.stage_config``).
Either way a stage only *reads* the pretraining checkpoint and writes under ``<run_dir>/eval/`` or to the
hub, so a failed stage leaves the checkpoint untouched and can be re-run alone with the same command line.

Requeue: the evaluation stages handle SIGTERM/SIGUSR1/SIGUSR2 like pretraining. The linear and finetune
stages checkpoint every epoch and on the signal (under ``<run_dir>/eval/``); kNN keeps nothing but its
optional feature cache. A stopped stage is recorded as ``interrupted``, the process exits 75, and rerunning
the same command (SLURM requeue, a replacement pod) resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from largessl.config import EVAL_STAGES, STAGES, Config
from largessl.distributed.collectives import barrier, broadcast_object, get_rank
from largessl.distributed.env import local_rank_from_env
from largessl.run import exit_codes

__all__ = ["EVAL_STAGES", "run_stages", "stage_commands", "stages_exit_code"]

log = logging.getLogger(__name__)

STAGES_JSON = "stages.json"


def _checkpoint_location(cfg: Config, run_dir: str | os.PathLike[str]) -> str:
    return cfg.checkpoint.dir or str(run_dir)


def stage_commands(cfg: Config, run_dir: str | os.PathLike[str],
                   executable: list[str] | None = None) -> list[list[str]]:
    """One command line per configured stage, in order; each runs that stage alone on ``run_dir``.

    ``executable`` defaults to ``[sys.executable, "-m", "largessl"]``; launchers that run in a container
    pass ``["largessl"]``. The linear and kNN stages may run under torchrun like pretraining.
    """
    exe = list(executable) if executable is not None else [sys.executable, "-m", "largessl"]
    ckpt = _checkpoint_location(cfg, run_dir)
    data = []
    if cfg.data.train_manifest:
        data += ["--train", cfg.data.train_manifest]
    if cfg.data.val_manifest:
        data += ["--val", cfg.data.val_manifest]
    cmds = []
    for stage in cfg.stages:
        if stage in EVAL_STAGES:
            cmds.append([*exe, "eval", stage, "--checkpoint", ckpt, "--out", str(run_dir), *data])
        elif stage == "push":
            cmd = [*exe, "hub", "push", ckpt, "--hub", cfg.hub.url]
            if cfg.hub.endpoint_url:
                cmd += ["--endpoint-url", cfg.hub.endpoint_url]
            if cfg.hub.name:
                cmd += ["--name", cfg.hub.name]
            if cfg.hub.version:
                cmd += ["--version", cfg.hub.version]
            if cfg.hub.include_full_checkpoint:
                cmd.append("--full-checkpoint")
            cmds.append(cmd)
        else:  # Config.validate rejects unknown stages before anything runs
            raise AssertionError(f"unknown stage {stage!r}; allowed: {STAGES}")
    return cmds


def _record(run_dir: Path, status: dict[str, Any]) -> None:
    from largessl.run.durable import write_json_atomic

    write_json_atomic(run_dir / "eval" / STAGES_JSON, status)


def _push_on_rank0(cfg: Config, ckpt: str, rank: int) -> dict[str, Any]:
    """Rank 0 pushes; the outcome is broadcast so every rank returns or raises together (no hang)."""
    outcome: tuple[str, Any] = ("ok", None)
    error: Exception | None = None
    if rank == 0:
        from largessl.hub.export import push_run

        try:
            card = push_run(ckpt, cfg.hub.url, cfg.hub.name, cfg.hub.version, cfg.hub.endpoint_url,
                            cfg.hub.include_full_checkpoint)
            outcome = ("ok", {"name": card["name"], "version": card["version"], "hub": cfg.hub.url})
        except Exception as e:
            error = e
            outcome = ("error", f"{type(e).__name__}: {e}")
    outcome = broadcast_object(outcome)  # type: ignore[assignment]
    barrier()
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise RuntimeError(f"push failed on rank 0: {outcome[1]}")
    return outcome[1]


def stages_exit_code(results: dict[str, Any]) -> int:
    """75 (requeue) when a stage was stopped by a signal, else 0."""
    stopped = any(isinstance(r, dict) and r.get("stopped") for r in results.values())
    return exit_codes.REQUEUE if stopped else exit_codes.OK


def run_stages(cfg: Config, run_dir: str | os.PathLike[str], stages: list[str] | None = None) -> dict[str, Any]:
    """Run ``stages`` (default ``cfg.stages``) in order, in this process; call on every rank.

    Returns {stage: result}. Status goes to ``<run_dir>/eval/stages.json``. The first failing stage
    stops the chain (push must not publish without the metrics it should carry) and its exception is
    re-raised after being recorded; the checkpoint is never modified. A stage stopped by a signal is
    recorded as ``interrupted`` and ends the chain; :func:`stages_exit_code` then gives 75.
    """
    from largessl.eval.runner import evaluate_finetune, evaluate_knn, evaluate_linear
    from largessl.eval.source import load_source
    from largessl.run.precision import resolve_device

    stages = list(cfg.stages if stages is None else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; allowed: {', '.join(STAGES)}")
    if not stages:
        return {}
    run_dir = Path(run_dir)
    ckpt = _checkpoint_location(cfg, run_dir)
    rank = get_rank()
    status: dict[str, Any] = {"checkpoint": ckpt, "stages": {s: "pending" for s in stages}}
    results: dict[str, Any] = {}
    source = None
    for stage in stages:
        log.info("stage %s: starting", stage)
        try:
            if stage in EVAL_STAGES:
                if source is None:
                    source = load_source(ckpt, cfg)[0]
                    source.backbone.to(resolve_device(cfg.train.device, local_rank_from_env()))
                device = next(source.backbone.parameters()).device
                fn = {"linear": evaluate_linear, "knn": evaluate_knn, "finetune": evaluate_finetune}[stage]
                results[stage] = fn(cfg, source, run_dir, device)
            else:
                results[stage] = _push_on_rank0(cfg, ckpt, rank)
            if isinstance(results[stage], dict) and results[stage].get("stopped"):
                status["stages"][stage] = "interrupted"
                status["error"] = f"{stage}: {results[stage].get('reason', 'stopped by a signal')}; rerun to resume"
                if rank == 0:
                    _record(run_dir, status)
                return results
            status["stages"][stage] = "ok"
        except Exception as e:
            status["stages"][stage] = "failed"
            status["error"] = f"{stage}: {type(e).__name__}: {e}"
            status["traceback"] = traceback.format_exc()
            if rank == 0:
                _record(run_dir, status)
            log.error("stage %s failed: %s; the checkpoint is unchanged, re-run the stage alone with "
                      "`largessl %s`", stage, e, "eval " + stage if stage in EVAL_STAGES else "hub push")
            raise
        if rank == 0:
            _record(run_dir, status)
    status["results"] = results
    if rank == 0:
        _record(run_dir, status)
    return results
