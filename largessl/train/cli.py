"""``largessl pretrain --config X.yaml [key=value ...]``: one process, torchrun, SLURM or a Kubernetes job.

Rerunning the same command on the same ``train.run_dir`` resumes from its newest complete checkpoint.
Exit codes: 0 done, 75 stopped by a signal or the time limit after saving (requeue), 1 a bug, 2 bad config,
3 environment (storage, a dead peer, rendezvous), 4 diverged (see :mod:`largessl.run.exit_codes`).
"""

from __future__ import annotations

import argparse
import logging

from largessl.config import load_config, resolve_run_dir
from largessl.distributed.env import (
    detect_env,
    init_distributed,
    resolve_backend,
    setup_logging,
    shutdown_distributed,
)
from largessl.run.precision import resolve_device

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl pretrain``."""
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although KEY (or every key of a section, e.g. optim) differs from the checkpoint's "
                        "config; repeatable or comma-separated. The change is recorded in config_history.jsonl "
                        "and metrics.jsonl. Without it an experiment-defining change is refused (exit 2)")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="when checkpoints exist but none passes verification, start again at step 0 (they are set "
                        "aside, metrics.jsonl is kept) instead of refusing")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.run_dir=runs/bt optim.base_lr=0.3")


def allowed_changes(values: list[str]) -> list[str]:
    """``--allow-change a,b --allow-change c`` → ``[a, b, c]``."""
    return [k.strip() for v in values for k in v.split(",") if k.strip()]


def run(args: argparse.Namespace) -> int:
    """Resolve the config, join the process group, train (resuming), then run the configured stages."""
    cfg = load_config(args.config, args.overrides)
    env = detect_env()
    logging.getLogger().handlers.clear()  # replace the CLI's default handler by the rank-aware one
    setup_logging(env, cfg.log.level)
    if not cfg.train.run_dir:
        cfg.train.run_dir = resolve_run_dir(cfg, world_size=env.world_size)
        log.warning("no train.run_dir given: this is a new run in %s; to resume it, rerun with "
                    "train.run_dir=%s", cfg.train.run_dir, cfg.train.run_dir)
    if cfg.stages:
        # the stages run in this process after pretraining: fail now, not when pretraining ends
        from largessl.run.preflight import check_stage_inputs

        check_stage_inputs(cfg)
    device = resolve_device(cfg.train.device, env.local_rank)
    backend = resolve_backend(cfg.dist.backend, device)
    init_distributed(env, backend, cfg.dist.timeout_minutes, cfg.dist.rendezvous_timeout_minutes, device)
    from largessl.train.trainer import build_trainer

    # No teardown after a failure: with a dead peer, destroying the process group can block forever; the
    # CLI ends the process with the failure's exit code instead (largessl.cli.main).
    trainer = build_trainer(cfg, env, allow_change=allowed_changes(args.allow_change),
                            restart_from_scratch=args.restart_from_scratch)
    own_lock = trainer.take_lock()  # held through the stages too: they write into the run directory
    try:
        result = trainer.fit()
        code = result.exit_code
        if code == 0 and cfg.stages:
            code = _run_stages(cfg, result.run_dir)
    finally:
        if own_lock is not None:
            own_lock.release()
    shutdown_distributed()
    return code


def _run_stages(cfg, run_dir: str) -> int:
    try:
        from largessl.stages import run_stages, stages_exit_code
    except ImportError:
        raise RuntimeError(f"stages {cfg.stages} were requested but largessl.stages is not available in this "
                           "installation; remove `stages` from the config or update largessl") from None
    # a stage stopped by a signal saved its state: exit 75 so the rerun resumes it
    return stages_exit_code(run_stages(cfg, run_dir))
