"""The pretraining loop: build once from the config, then ``fit()`` (resuming automatically).

Per step: next batch → :func:`largessl.train.step.train_step` → lr from :mod:`schedules` (a pure function of
the step) → on log steps only: ``.item()``, cross-rank sums and collapse metrics → checkpoint cadence → the
stop flag (signals / time limit). Every rank runs the same sequence of collectives; only rank 0 writes
metrics. A stop request saves a checkpoint on every rank and ends with ``exit_codes.REQUEUE``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed import ProcessGroup

from largessl.config import Config, RunPlan, config_to_dict, load_config, plan_run, save_config
from largessl.data.batch import Batch
from largessl.distributed.collectives import (
    all_reduce_sum_no_grad,
    barrier,
    broadcast_object,
    device_values,
    get_rank,
    get_world_size,
)
from largessl.distributed.env import DistEnv, StallWatchdog, stall_timeout_s
from largessl.methods import build_method
from largessl.methods.base import MethodOutput, check_output
from largessl.models import build_backbone, prefers_channels_last
from largessl.models.state_dict import strip_compile_prefix
from largessl.run import exit_codes
from largessl.run.checkpoint import (
    CheckpointManager,
    SavePayload,
    git_revision,
    storage_error,
)
from largessl.run.completion import remove_marker, write_marker
from largessl.run.exit_codes import exit_code_for
from largessl.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE
from largessl.run.lock import RunLock, RunLockedError
from largessl.run.precision import PrecisionPolicy, resolve_device, resolve_precision
from largessl.run.progress import ProgressBar
from largessl.run.restart import (
    RestartDecision,
    append_history,
    check_restart,
    describe,
    history_record,
    metrics_event,
)
from largessl.run.rng import capture_rng_state, restore_rng_state
from largessl.run.signals import StopFlag
from largessl.run.sinks import JsonlSink, MetricSink, TensorBoardSink
from largessl.run.state import start_record, state_for_exit, write_state
from largessl.train.collapse_guard import CollapseGuard
from largessl.train.online_probe import OnlineProbe
from largessl.train.optim import build_optimizer
from largessl.train.schedules import apply_lr
from largessl.train.step import train_step

log = logging.getLogger(__name__)


class TrainStream(Protocol):
    """What the trainer needs from the data pipeline (``largessl.data.stream.build_train_stream``)."""

    batches_per_epoch: int
    num_classes: int

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` for this rank, starting at ``start_batch`` (exact resume)."""


@dataclass
class FitResult:
    """How :meth:`Trainer.fit` ended."""

    exit_code: int
    """``exit_codes.OK`` when all steps ran, ``exit_codes.REQUEUE`` after a stop request."""
    step: int
    """Optimizer steps completed."""
    reason: str
    """Why training ended."""
    run_dir: str
    """The run directory."""
    last_metrics: dict[str, Any]
    """The last logged record."""


def _configure_determinism(deterministic: bool, device: torch.device) -> None:
    if not deterministic:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace to be deterministic; must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


class _SkipCounter:
    """Sums the workers' cumulative skip counters (``Batch.stats``) into one running total per counter."""

    def __init__(self) -> None:
        self.latest: dict[tuple[int, str], int] = {}

    def update(self, stats: dict[str, int]) -> None:
        worker = int(stats.get("worker", 0))
        for k, v in stats.items():
            if k != "worker" and isinstance(v, int):
                self.latest[(worker, k)] = max(v, self.latest.get((worker, k), 0))

    def total(self, name: str) -> int:
        return sum(v for (w, k), v in self.latest.items() if k == name)


SKIP_COUNTERS = ("skipped_samples", "skipped_shards")
"""Bad-data counters of the run: logged in every metrics record, saved with the data position, summed across resumes."""


class Trainer:
    """Owns model, optimizer, checkpoints and sinks of one run; ``fit()`` trains to ``plan.num_steps``."""

    def __init__(self, cfg: Config, env: DistEnv, stream: TrainStream, num_train_samples: int,
                 group: ProcessGroup | None = None, device: torch.device | None = None,
                 allow_change: Sequence[str] = (), restart_from_scratch: bool = False,
                 run_lock: RunLock | None = None) -> None:
        if not cfg.train.run_dir:
            raise ValueError("train.run_dir is empty; name the run directory (largessl.config.resolve_run_dir "
                             "derives a unique one for a single process)")
        self.cfg = cfg
        self.allow_change = tuple(allow_change)
        """Experiment-defining keys this run may change against its checkpoint (``--allow-change``)."""
        self.restart_from_scratch = restart_from_scratch
        """Start at step 0 when checkpoints exist but none verifies (``--restart-from-scratch``); else refuse."""
        self.run_lock = run_lock
        """The run directory's lock when the caller holds it (rank 0); else :meth:`fit` takes it."""
        self._events: list[dict[str, Any]] = []
        """metrics.jsonl records of this start (an allowed config change, a restart from scratch)."""
        self._restart_decision: tuple[RestartDecision, str] | None = None
        self._lock_agreed = False
        """Every rank: the lock was taken (on rank 0) and agreed on; :meth:`fit` must not take it again."""
        self.env = env
        self.stream = stream
        self.group = group
        self.rank = get_rank(group)
        self.world_size = get_world_size(group)
        self.device = device or resolve_device(cfg.train.device, env.local_rank)
        _configure_determinism(cfg.train.deterministic, self.device)
        self.policy: PrecisionPolicy = resolve_precision(cfg.train, self.device)
        self.plan = self._plan(num_train_samples)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or str(self.run_dir / CHECKPOINTS_DIR),
                                      keep=cfg.checkpoint.keep, rank=self.rank, group=group,
                                      endpoint_url=cfg.checkpoint.endpoint_url or cfg.data.endpoint_url)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        backbone = build_backbone(cfg.model, group)
        if self.policy.channels_last and cfg.train.channels_last is None and not prefers_channels_last(backbone):
            # the GPU default; a ViT's single patch-embedding conv gains nothing from NHWC and its reshapes pay
            self.policy = dataclasses.replace(self.policy, channels_last=False)
            log.info("channels_last off for %s (a transformer: one patch conv, then matmuls)", cfg.model.arch)
        self.module: nn.Module = build_method(cfg.method, backbone, group).to(self.device)
        if self.policy.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        if self.policy.compile:
            # In place: the state_dict keeps its plain keys (no _orig_mod.), so checkpoints load with or
            # without compile, and DDP/optimizer see the same parameters.
            self.module.backbone.compile()
        self.optimizer = build_optimizer(self.module, cfg.optim, self.plan.lr, self.plan.bias_norm_lr)
        self.scaler = self.policy.make_scaler()
        self.engine = None
        self.model: nn.Module = self.module
        if cfg.dist.strategy == "deepspeed":
            from largessl.train.deepspeed_engine import build_engine

            self.engine = build_engine(self.module, self.optimizer, cfg.dist.zero_stage,
                                       self.plan.per_rank_batch_size, self.world_size, cfg.train.grad_clip,
                                       self.policy, self.device)
        elif self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.dist.find_unused_parameters, process_group=group)
        self._buckets_settled = not isinstance(self.model, nn.parallel.DistributedDataParallel) \
            or cfg.dist.find_unused_parameters
        """False until :meth:`_settle_buckets` ran in this process (DDP without find_unused_parameters only)."""
        self.probe = self._build_probe(backbone)
        self.guard = (CollapseGuard(cfg.method.name, cfg.train.collapse_guard_patience, self.plan.warmup_steps)
                      if cfg.train.collapse_guard else None)
        """Stops a collapsed run (exit 5) after the warm-up; None when ``train.collapse_guard=false``."""
        self.step = 0
        self._last_loss: torch.Tensor | None = None
        self._watchdog: StallWatchdog | None = None
        """The last step's loss, a device tensor (read only at save time: no per-step sync)."""
        self.skips = _SkipCounter()  # this process's counts (the stream's per-worker cumulative stats)
        self.skip_base = dict.fromkeys(SKIP_COUNTERS, 0)  # whole-run totals at the checkpoint resumed from

    # -------------------------------------------------------------------------------------------
    # setup helpers

    def _plan(self, num_train_samples: int) -> RunPlan:
        bpe = self.stream.batches_per_epoch
        if bpe != num_train_samples // self.cfg.train.global_batch_size:
            # The stream's count is what each rank really gets; the schedule must follow it.
            log.info("stream gives %d batches per epoch per rank (sample count suggests %d); using the stream's",
                     bpe, num_train_samples // self.cfg.train.global_batch_size)
        plan = plan_run(self.cfg, self.world_size, num_train_samples, steps_per_epoch=bpe)
        log.info("plan: %d rank(s) x %d = global batch %d; %d steps (%d per epoch, %d warm-up); "
                 "lr %.4g, bias/norm lr %.4g", plan.world_size, plan.per_rank_batch_size, plan.global_batch_size,
                 plan.num_steps, plan.steps_per_epoch, plan.warmup_steps, plan.lr, plan.bias_norm_lr)
        return plan

    def _build_probe(self, backbone: nn.Module) -> nn.Module | None:
        if not self.cfg.eval.online_probe or self.stream.num_classes < 2:
            return None
        return OnlineProbe(backbone.num_features, self.stream.num_classes, self.cfg.eval.online_probe_lr,
                           group=self.group).to(self.device)

    # -------------------------------------------------------------------------------------------
    # checkpoints

    def _skip_totals(self) -> dict[str, int]:
        """Collective: the whole run's skip counters (every rank, every earlier run since step 0)."""
        local = torch.tensor([float(self.skips.total(k)) for k in SKIP_COUNTERS], dtype=torch.float64,
                             device=self.device)
        all_reduce_sum_no_grad(local, self.group)
        return {k: self.skip_base[k] + int(v) for k, v in zip(SKIP_COUNTERS, local.tolist())}

    def _data_position(self) -> dict[str, Any]:
        """Collective (called by every rank in ``save``): the data position plus the run's skip counters."""
        epoch, batch = divmod(self.step, self.plan.steps_per_epoch)
        pos: dict[str, Any] = {"epoch": epoch, "batch_in_epoch": batch, "world_size": self.world_size,
                               "num_workers": self.cfg.data.num_workers, "seed": self.cfg.train.seed}
        if hasattr(self.stream, "position_state"):
            pos = dict(self.stream.position_state(epoch, batch))
        pos["batches_per_epoch"] = self.plan.steps_per_epoch
        pos.update(self._skip_totals())  # identical on every rank, so any rank's file restores them
        return pos

    def check_finite_state(self) -> None:
        """Collective: raise ``FloatingPointError`` (exit 4) unless the last loss and every parameter are finite,
        and ``RuntimeError`` (exit 3) when rank 0 lost the run directory's lock.

        Runs at save time only, before anything is written, so a diverged run never turns a NaN model into
        the latest checkpoint: the previous good one stays latest. One fused norm pass over the
        parameters (NaN/Inf propagate into a norm), one 2-element all-reduce and one host sync per save.
        """
        params = [p.detach() for p in self.module.parameters()]
        norms = torch.stack(torch._foreach_norm(params)) if params else torch.zeros(1, device=self.device)
        loss = self._last_loss if self._last_loss is not None else torch.zeros((), device=self.device)
        lock_lost = torch.tensor(bool(self.run_lock is not None and self.run_lock.lost), device=self.device)
        bad = torch.stack([(~torch.isfinite(loss.float())).any(), (~torch.isfinite(norms.float())).any(),
                           lock_lost]).double()
        all_reduce_sum_no_grad(bad, self.group)
        bad_loss, bad_params, lost = (v > 0 for v in bad.tolist())
        if lost:
            # rank 0 raises the reason; the others learn it from the same all-reduce (no rank left waiting)
            if self.run_lock is not None:
                self.run_lock.check()
            raise RuntimeError(f"rank 0 lost the lock of train.run_dir {self.run_dir} (another process took the run "
                               "over); not saving")
        if bad_loss or bad_params:
            what = " and ".join(w for w, b in (("the loss", bad_loss), ("the parameters", bad_params)) if b)
            raise FloatingPointError(
                f"{what} hold NaN/Inf at step {self.step} on at least one rank; not saving this state, the latest "
                f"checkpoint stays the previous good one. Lower optim.base_lr, check the data, or train in fp32")

    def save(self, metrics: dict[str, Any]) -> str:
        """Collective: every rank contributes its state to ``step-<self.step>/`` (finite states only)."""
        self.check_finite_state()
        rank_state = {"rng": capture_rng_state(), "data": self._data_position(), "rank": self.rank}
        payload = SavePayload(rank_state=rank_state)
        if self.engine is not None:
            from largessl.train.deepspeed_engine import save_engine

            payload.write_extra = lambda staging: save_engine(self.engine, staging)
        if self.rank == 0:
            payload.model_state = self.module.state_dict()
            payload.training_state = {
                "step": self.step,
                "epoch": self.step // self.plan.steps_per_epoch,
                # With DeepSpeed the optimizer lives in the deepspeed/ files (partitioned per rank).
                "optimizer": self.optimizer.state_dict() if self.engine is None else {},
                "scheduler": {"step": self.step, "kind": "warmup_cosine"},
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "probe": self.probe.full_state_dict() if self.probe is not None else {},
            }
            payload.meta = {"step": self.step, "epoch": self.step / self.plan.steps_per_epoch,
                            "git_revision": git_revision(), "metrics": metrics,
                            "world_size": self.world_size, "strategy": self.cfg.dist.strategy,
                            "config": config_to_dict(self.cfg)}
        return self.ckpt.save(self.step, payload)

    def resume(self) -> bool:
        """Load the newest verified checkpoint if there is one (every rank); returns whether it resumed.

        Each rank reads each byte it needs once, verifying hashes as they stream (see CheckpointManager.load):
        training.pt, meta.json, its rank file, and model.safetensors (DDP) or its DeepSpeed files (on another world
        size, the old ZeRO partitions its new share overlaps: :mod:`largessl.train.deepspeed_engine`). Before any
        state is applied, the checkpoint's config is compared with this run's (:mod:`largessl.run.restart`): an
        experiment-defining change that ``allow_change`` does not name raises ``ValueError``. When checkpoints
        exist but none verifies, it raises too, unless ``restart_from_scratch``.
        """
        extra = more = None
        if self.engine is not None:
            from largessl.train.deepspeed_engine import is_shared_file, partitions_to_read

            # the shared DeepSpeed files, then the optimizer partitions this rank needs (its own, or on another
            # world size those overlapping its new share, found from the saved layout)
            extra, more = is_shared_file, functools.partial(partitions_to_read, self.engine)
        loaded = self.ckpt.load(read_model=self.engine is None, extra_files=extra, more_files=more)
        if loaded is None:
            self._no_checkpoint()
            return False
        path, state, rank_state = loaded.path, loaded.training, loaded.rank_state
        try:
            decision = self._check_restart(path, state["meta"])
        except BaseException:
            loaded.close()
            raise
        saved_world = int(state["meta"].get("world_size", self.world_size))
        saved_stage = state["meta"].get("config", {}).get("dist", {}).get("zero_stage", self.cfg.dist.zero_stage)
        if self.engine is not None and saved_stage != self.cfg.dist.zero_stage:
            loaded.close()
            # ZeRO-0 keeps the optimizer whole in the module states, ZeRO-1/2 in per-rank partitions: the files
            # of one stage are not the other's, so refuse before loading any state.
            raise ValueError(f"checkpoint {path} was written by DeepSpeed ZeRO stage {saved_stage}, this run uses "
                             f"dist.zero_stage={self.cfg.dist.zero_stage}: DeepSpeed's optimizer state resumes only "
                             f"on the stage it was written with (any world size). Relaunch with "
                             f"dist.zero_stage={saved_stage}, or start a new train.run_dir")
        # The optimizer's state (momentum buffers) comes from the checkpoint; its hyperparameters (peak lr, weight
        # decay, momentum, ...) come from this run's config: loading a state_dict would bring back the old ones, so
        # an allowed optim.* change would be logged but not used.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.engine is not None:
            from largessl.train.deepspeed_engine import load_engine

            try:  # module weights and this rank's optimizer partition, from the verified local copies
                load_engine(self.engine, loaded.extra_dir, saved_world)
            finally:
                loaded.close()
        else:
            self.module.load_state_dict(strip_compile_prefix(loaded.model), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.probe is not None and state.get("probe"):
            self.probe.load_full_state_dict(state["probe"])
        self.step = int(state["step"])
        # Positions are identical on every rank; a rank the old run did not have got rank 0's (load()).
        pos = rank_state["data"]
        if pos.get("batches_per_epoch", self.plan.steps_per_epoch) != self.plan.steps_per_epoch:
            raise ValueError(f"checkpoint {path} was written with {pos['batches_per_epoch']} batches per "
                             f"epoch, the stream now gives {self.plan.steps_per_epoch}; resume with the same "
                             "data and train.global_batch_size, or start a new train.run_dir")
        expected = divmod(self.step, self.plan.steps_per_epoch)
        if hasattr(self.stream, "resume_batch"):
            # The global batch is fixed, so the position is the same on any world size; a changed split
            # re-splits the epoch's unread samples (exactly once) or raises, per train.allow_resplit.
            where = tuple(self.stream.resume_batch(pos, allow_resplit=self.cfg.train.allow_resplit))
        else:
            if saved_world != self.world_size:
                raise ValueError(f"checkpoint {path} was written by {saved_world} rank(s), this run has "
                                 f"{self.world_size}, and this data stream ({type(self.stream).__name__}) cannot "
                                 "re-split an epoch (train.allow_resplit needs the shard stream); resume on "
                                 f"{saved_world} rank(s)")
            where = (pos["epoch"], pos["batch_in_epoch"])
        if where != expected:
            raise ValueError(f"checkpoint {path}: data position {where} does not match step {self.step} "
                             f"(expected epoch/batch {expected}); the dataset or batch size changed")
        self.skip_base = {k: int(pos.get(k, 0)) for k in SKIP_COUNTERS}
        self.skips = _SkipCounter()
        if saved_world == self.world_size:
            restore_rng_state(rank_state["rng"])
        else:
            log.warning("checkpoint %s was written by %d rank(s), now %d: continuing at epoch %d batch %d on a "
                        "re-split of the epoch's unread samples (each still seen once; batch composition and "
                        "per-rank RNG streams differ from an uninterrupted run)", path, saved_world,
                        self.world_size, *expected)
        log.info("resumed from %s at step %d", path, self.step)
        self._restart_decision = (decision, path)
        return True

    def _check_restart(self, path: str, meta: dict[str, Any]) -> RestartDecision:
        """Every rank (each read meta.json): compare the checkpoint's config with this run's."""
        old = meta.get("config")
        if not isinstance(old, dict):
            log.warning("checkpoint %s records no config; its experiment cannot be compared with this run's", path)
            return RestartDecision()
        defaults = config_to_dict(load_config([], [f"method.name={self.cfg.method.name}"]))
        decision = check_restart(old, config_to_dict(self.cfg), self.allow_change, defaults,
                                 where=f"checkpoint {path}")
        for unused in decision.unused_allows:
            log.warning("--allow-change %s: nothing under that key changed", unused)
        if decision.safe:
            log.info("restart-safe changes since checkpoint %s: %s", path, describe(decision.safe))
        if decision.allowed:
            log.warning("experiment changed on purpose (--allow-change) from step %d: %s", int(meta.get("step", 0)),
                        describe(decision.allowed))
        return decision

    def _no_checkpoint(self) -> None:
        """No checkpoint loaded: fine for a new run; refused when step folders exist that all failed verification
        (a silent restart from step 0 would throw the run away), unless ``restart_from_scratch``."""
        found = [n for _, n in self.ckpt.store.list_steps()] if self.rank == 0 else None
        found = broadcast_object(found, 0, self.group)
        if not found:
            return
        if not self.restart_from_scratch:
            raise ValueError(
                f"train.run_dir {self.run_dir}: none of the checkpoints in {self.ckpt.dir} ({', '.join(found[:5])}"
                f"{' ...' if len(found) > 5 else ''}) passed verification (see the warnings above), and starting over "
                "at step 0 would silently discard the run. Restore a checkpoint, or rerun with "
                "--restart-from-scratch to start again from step 0 (the failed checkpoints are set aside as "
                "unverified-step-N and metrics.jsonl is kept as metrics.before-restart-<time>.jsonl)")
        if self.rank == 0:
            moved = self.ckpt.set_aside_unverified()
            archived = ""
            metrics = self.run_dir / METRICS_FILE
            if metrics.exists():
                archived = f"metrics.before-restart-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
                os.replace(metrics, self.run_dir / archived)
            log.warning("restarting from step 0 (--restart-from-scratch): no checkpoint verified; earlier metrics "
                        "kept in %s", archived or "(none)")
            self._events.append({"step": 0, "event": "restart_from_scratch", "unverified": moved,
                                 "archived_metrics": archived})
        barrier(self.group)

    # -------------------------------------------------------------------------------------------
    # the loop

    def _sinks(self, resumed_step: int) -> list[MetricSink]:
        if self.rank != 0:
            return []
        jsonl = JsonlSink(self.run_dir / METRICS_FILE, resume_step=resumed_step)
        for event in self._events:  # after the truncation to the resumed step, before the first new record
            jsonl.write(event)
        sinks: list[MetricSink] = [jsonl]
        if self.cfg.log.tensorboard and "tensorboard" in self.cfg.log.trackers:
            sinks.append(TensorBoardSink(self.run_dir / "tb", purge_step=resumed_step + 1))
        external = [t for t in self.cfg.log.trackers if t != "tensorboard"]
        if external:
            from largessl.run.trackers import build_trackers

            sinks += build_trackers(external, self.run_dir, config_to_dict(self.cfg), self.cfg.log)
        return sinks

    def _collapse(self, out: MethodOutput) -> dict[str, float]:
        try:
            from largessl.metrics.collapse import collapse_metrics
        except ImportError:
            return {}
        if not out.embeddings:
            return {}
        z_other = out.embeddings[1] if len(out.embeddings) > 1 else None
        return {f"collapse/{k}": float(v) for k, v in
                collapse_metrics(out.embeddings[0].float(), group=self.group, z_other=z_other).items()}

    def fit(self) -> FitResult:
        """Train until ``plan.num_steps`` or a stop request; resumes from the run directory first.

        Order, so that a refused run writes nothing: take the run directory's lock (a second run exits 2 here),
        remove interrupted saves, resume (a changed experiment or an unverifiable checkpoint exits 2 here), and
        only then write config.yaml and the config history. A run that reaches its last step writes the
        completion marker the stage jobs wait for.
        """
        cfg = self.cfg
        took_here = not self._lock_agreed and self.run_lock is None
        own_lock = self.take_lock()
        try:
            if self.rank == 0:
                # Before anything new is written: a save that was killed or hit a full disk may hold the space.
                self.ckpt.cleanup_interrupted()
            log.info("run directory: %s", self.run_dir.resolve())
            stop = StopFlag(cfg.train.max_minutes, self.group, self.device).install()
            watchdog = self._start_watchdog()
            result, started = None, False
            try:
                self.resume()
                if self.rank == 0:
                    self._record_start()
                    write_state(self.run_dir, **start_record(self.step, self.plan.num_steps,
                                                             self.plan.global_batch_size))
                    started = True
                result = self._loop(stop)
                if result.exit_code == exit_codes.OK and self.rank == 0:
                    self._mark_complete()
                if self.rank == 0:
                    write_state(self.run_dir, state=state_for_exit(result.exit_code), exit_code=result.exit_code,
                                reason=result.reason, step=result.step)
                return result
            except BaseException as e:
                if started:  # a refused start (changed config, no verified checkpoint) leaves the record alone
                    code, message = exit_code_for(e)
                    write_state(self.run_dir, state=state_for_exit(code), exit_code=code, reason=message,
                                step=self.step)
                raise
            finally:
                if watchdog is not None:
                    watchdog.stop()
                    self._watchdog = self.ckpt.watchdog = None
                # After a stop request the handlers stay: more signals while the process winds down must not
                # turn the requeue exit code into death-by-signal. A completed run restores the old handlers.
                if result is None or result.exit_code == exit_codes.OK:
                    stop.uninstall()
                else:
                    stop.ignore_further()
        finally:
            if took_here:  # else the caller (the CLI, holding it through the stages) gives it back
                if own_lock is not None:
                    own_lock.release()
                self.run_lock = None
                self._lock_agreed = False

    def take_lock(self) -> RunLock | None:
        """Collective: rank 0 takes ``<run_dir>/run.lock`` unless the caller holds it; every rank raises
        :class:`RunLockedError` (exit 2) when another live process owns the run. Returns the lock taken here."""
        if self.run_lock is not None or self._lock_agreed:
            return None  # held by the caller, or taken earlier on every rank (rank 0 holds it)
        lock, refusal = None, None
        if self.rank == 0:
            lock = RunLock(self.run_dir, self.cfg.train.lock_lease_seconds)
            try:
                lock.acquire()
            except RunLockedError as e:
                refusal = str(e)
            except OSError as e:
                refusal = f"rank 0 could not take the lock {lock.path}: {e}"
                if self.world_size == 1:
                    raise storage_error(e, lock.path) from e
        refusal = broadcast_object(refusal, 0, self.group)
        if refusal:
            raise RunLockedError(refusal)
        self.run_lock = lock
        self._lock_agreed = True
        return lock

    def _record_start(self) -> None:
        """Rank 0, once the restart is accepted: config.yaml, the config history, and no completion marker while
        the run trains again."""
        decision_path = getattr(self, "_restart_decision", None)
        if decision_path is not None:
            decision, path = decision_path
            if decision.changed:
                record = history_record(decision, self.step, path, self.allow_change)
                try:
                    written = append_history(self.run_dir, record)
                except OSError as e:
                    raise storage_error(e, self.run_dir / "config_history.jsonl") from e
                if written and decision.allowed:
                    self._events.append(metrics_event(decision, self.step))
        self._write_run_config()
        if self.step < self.plan.num_steps:
            for location, endpoint in self._marker_locations():
                try:
                    remove_marker(location, endpoint)
                except OSError as e:
                    raise storage_error(e, location) from e

    def _marker_locations(self) -> list[tuple[str, str]]:
        """Where the completion marker goes: the run directory, and the checkpoint directory when it is elsewhere
        (stage jobs look where their --checkpoint points)."""
        out = [(str(self.run_dir), "")]
        if self.cfg.checkpoint.dir:
            out.append((self.cfg.checkpoint.dir, self.cfg.checkpoint.endpoint_url or self.cfg.data.endpoint_url))
        return out

    def _mark_complete(self) -> None:
        """Rank 0, after the last step's checkpoint: write ``pretrain-complete.json``."""
        latest = self.ckpt.store.url_of(self.ckpt.store.list_steps()[0][1]) if self.ckpt.store.list_steps() else ""
        record = {"step": self.step, "num_steps": self.plan.num_steps, "checkpoint": latest,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for location, endpoint in self._marker_locations():
            write_marker(location, record, endpoint)

    def _start_watchdog(self) -> StallWatchdog | None:
        """With several ranks: exit 3 when no step completes for the collective timeout plus a margin (a dead
        peer where no collective timeout fires). Every completed step is a beat, so the first step, which
        holds torch.compile and cuDNN autotuning and can take minutes, never counts; checkpoint I/O pauses it."""
        if self.world_size < 2:
            return None
        self._watchdog = StallWatchdog(stall_timeout_s(self.cfg.dist.timeout_minutes)).start()
        self.ckpt.watchdog = self._watchdog
        return self._watchdog

    def _write_run_config(self) -> None:
        """config.yaml of the run (rank 0), after removing temp files of an earlier write that failed."""
        path = self.run_dir / CONFIG_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(f".{CONFIG_FILE}.tmp-*"):
                stale.unlink(missing_ok=True)
            save_config(self.cfg, path)
        except OSError as e:
            for partial in self.run_dir.glob(f".{CONFIG_FILE}.tmp-*"):  # e.g. a full disk: no empty temp file stays
                partial.unlink(missing_ok=True)
            raise storage_error(e, path) from e

    def _loop(self, stop: StopFlag) -> FitResult:
        cfg, plan = self.cfg, self.plan
        sinks = self._sinks(self.step)
        bar = ProgressBar(plan.num_steps, self.step, enabled=cfg.log.progress and self.rank == 0,
                          interval_s=cfg.log.progress_every_s)
        skips = self.skips
        self.model.train()
        # On GPU, .item() on the agreed flag would sync the stream every step: check on log steps there.
        check_every = 1 if self.device.type == "cpu" else cfg.train.log_every
        last: dict[str, Any] = {}
        t_start = time.perf_counter()
        start_step = self.step
        t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
        reason, code = "completed", exit_codes.OK
        try:
            while self.step < plan.num_steps:
                epoch, start_batch = divmod(self.step, plan.steps_per_epoch)
                batches = iter(self.stream.iterate(epoch, start_batch))
                stopped = False
                while self.step < plan.num_steps:
                    t0 = time.perf_counter()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    wait_window += time.perf_counter() - t0
                    skips.update(batch.stats)
                    out, probe_metrics, lr = self.hot_step(batch)
                    self.step += 1
                    if self._watchdog is not None:
                        self._watchdog.beat()
                    steps_window += 1
                    end_of_epoch = self.step % plan.steps_per_epoch == 0
                    is_log = self.step % cfg.train.log_every == 0 or self.step == plan.num_steps
                    is_collapse = self.step % cfg.train.collapse_every == 0
                    if is_log or is_collapse:
                        elapsed = time.perf_counter() - t_window
                        last = self._record(out, probe_metrics, lr, steps_window, elapsed, wait_window, skips,
                                            is_collapse)
                        for s in sinks:
                            s.write(last)
                        t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
                    collapse = self.guard.observe(self.step, last) if is_collapse and self.guard else ""
                    if "loss" in last:  # nothing to show before the first logged step
                        bar.update(1, loss=f"{last['loss']:.4g}", img_s=f"{last.get('images_per_s', 0.0):.0f}")
                    else:
                        bar.update(1)
                    done = self.step >= plan.num_steps
                    if (self.step % cfg.checkpoint.every_steps == 0 or done or collapse
                            or (end_of_epoch and cfg.checkpoint.at_epoch_end)):
                        self.save(last)
                        saved_at = self.step
                    else:
                        saved_at = -1
                    if collapse and not done:
                        log.error("%s; checkpoint saved at step %d", collapse, self.step)
                        reason, code = collapse, exit_codes.COLLAPSED
                        stopped = True
                        break
                    if not done and (self.step % check_every == 0) and stop.agreed():
                        if saved_at != self.step:
                            self.save(last)
                        reason, code = f"stopped: {stop.reason}; checkpoint saved at step {self.step}", \
                            exit_codes.REQUEUE
                        stopped = True
                        break
                    if end_of_epoch:
                        break
                if stopped:
                    break
                if self.step < plan.num_steps and self.step % plan.steps_per_epoch != 0:
                    raise RuntimeError(f"the data stream ended epoch {epoch} after batch "
                                       f"{self.step % plan.steps_per_epoch} but promised {plan.steps_per_epoch} "
                                       "batches per epoch")
        except BaseException:
            bar.close()
            for s in sinks:
                try:
                    s.close()
                except OSError as e:  # the error in flight is the one to report (often the same full disk)
                    log.warning("could not close a metrics sink: %s", e)
            raise
        bar.close()
        for s in sinks:
            s.close()
        minutes = (time.perf_counter() - t_start) / 60
        log.info("%s after %d step(s) (%d this run, %.1f min); final loss %s; run directory %s; "
                 "TensorBoard: tensorboard --logdir %s", reason, self.step, self.step - start_step, minutes,
                 f"{last['loss']:.5g}" if "loss" in last else "n/a", self.run_dir.resolve(),
                 (self.run_dir / "tb").resolve())
        return FitResult(code, self.step, reason, str(self.run_dir), last)

    def hot_step(self, batch: Batch) -> tuple[MethodOutput, dict[str, torch.Tensor], float]:
        """Every step's work (not the log or save steps' extras): the batch to the device, the learning rate,
        forward/backward/update and the online probe; returns the output, the probe's device metrics and the
        lr. Nothing here waits for the device (``tests/unit/test_host_syncs.py`` counts it on every method)."""
        cfg, plan = self.cfg, self.plan
        batch = batch.to(self.device, memory_format=torch.channels_last if self.policy.channels_last
                         else torch.contiguous_format)
        if not self._buckets_settled:
            self._settle_buckets(batch.views)
        lr = apply_lr(self.optimizer, self.step, plan.warmup_steps, plan.num_steps, cfg.optim.final_lr_ratio)
        out = train_step(self.model, batch.views, self.step, self.optimizer, self.policy, self.scaler,
                         cfg.train.grad_clip, self.engine)
        self._last_loss = out.loss.detach()
        probe_metrics: dict[str, torch.Tensor] = {}
        if self.probe is not None and out.features is not None:
            probe_metrics = self.probe.step(out.features, batch.labels)
        return out, probe_metrics, lr

    def _settle_buckets(self, views: list[torch.Tensor]) -> None:
        """One discarded forward/backward, so that every real step of this process reduces through the same
        gradient buckets, whether the run started at step 0 or resumed.

        DDP lays out its gradient buckets in reverse parameter order, then rebuilds them after the first
        backward in the order gradients became ready. The layout decides how each all-reduce is chunked; on
        3+ ranks the ring sums chunks in an order that depends on it, so a run resumed at step k (k reduced
        through the initial buckets) drifts from one that never stopped (k reduced through rebuilt ones) by
        float rounding (~1e-8), and bitwise resume fails. Two ranks add two numbers: commutative, unaffected.
        Weights, optimizer, buffers (BN running stats, whitening statistics) and RNG states are left as they
        were; the cost is one extra forward/backward per process start, none per step.
        """
        self._buckets_settled = True
        buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        with self.policy.autocast():
            out = self.model(views, self.step)
        out.loss.backward()  # a scaler would only scale it: the buckets fill in the same order
        self.module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def _record(self, out: MethodOutput, probe: dict[str, torch.Tensor], lr: float, steps: int, elapsed: float,
                wait: float, skips: _SkipCounter, with_collapse: bool) -> dict[str, Any]:
        """A log step's record: the only place with .item() and cross-rank sums (sync points)."""
        # Names the step, the non-finite loss terms and views (methods skip this per-step sync on GPU).
        check_output(self.cfg.method.name, out, self.step)
        loss = float(out.loss.detach().float().item())
        # One all-reduce for every cross-rank number of this record: throughput, data wait, skips.
        host = [steps * self.plan.per_rank_batch_size, elapsed, wait, *[float(skips.total(k)) for k in SKIP_COUNTERS]]
        # The probe's values are device tensors already: stack them on the device instead of syncing each.
        counters = device_values(host, self.device)
        if probe:
            counters = torch.cat([counters, torch.stack([v.detach().double() for v in probe.values()])])
        all_reduce_sum_no_grad(counters, self.group)
        c = counters.tolist()  # one device-to-host copy for all of them
        world = self.world_size
        rec: dict[str, Any] = {
            "step": self.step,
            "epoch": self.step / self.plan.steps_per_epoch,
            "loss": loss,
            **{k: float(v.item()) for k, v in out.metrics.items()},
            "lr": lr,
            "images_per_s": c[0] / max(c[1] / world, 1e-9),
            "data_wait_frac": c[2] / max(c[1], 1e-9),
            # whole-run totals: earlier runs' (from the checkpoint) plus every rank's since the resume
            **{k: self.skip_base[k] + int(c[3 + i]) for i, k in enumerate(SKIP_COUNTERS)},
        }
        for i, k in enumerate(probe):
            rec[k] = c[3 + len(SKIP_COUNTERS) + i] / world
        if with_collapse:
            rec.update(self._collapse(out))
        return rec


def build_trainer(cfg: Config, env: DistEnv, group: ProcessGroup | None = None, allow_change: Sequence[str] = (),
                  restart_from_scratch: bool = False) -> Trainer:
    """The real path: read the train manifest, build the shard stream, then the trainer."""
    from largessl.data.manifest import read_manifest
    from largessl.data.stream import build_train_stream

    if not cfg.data.train_manifest:
        raise ValueError("data.train_manifest is empty; point it at a manifest written by `largessl shards write`")
    from largessl.data.io import storage_options_for

    manifest = read_manifest(cfg.data.train_manifest,
                             storage_options_for(cfg.data.train_manifest, cfg.data.endpoint_url))
    world = get_world_size(group)
    rank = get_rank(group)
    if cfg.train.global_batch_size % world:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the world "
                         f"size {world}; use a multiple of {world}")
    device = resolve_device(cfg.train.device, env.local_rank)
    # data.decode=gpu decodes and augments on this device; the CPU path ignores it
    stream = build_train_stream(cfg.data, manifest, cfg.train.global_batch_size // world, rank, world,
                                cfg.train.seed, device=device)
    return Trainer(cfg, env, stream, manifest.num_samples, group, device=device, allow_change=allow_change,
                   restart_from_scratch=restart_from_scratch)
