"""A run is one experiment: what a restart may change, and how an explicit change is recorded.

At resume the trainer compares the new resolved config with the one the checkpoint was trained with (its
``meta.json``). Keys in :data:`RESTART_SAFE` say *where* or *how often* the run works -- loader workers, log and
checkpoint cadence, time limits, endpoints, timeouts, the stages that follow -- and may change on any restart
(they are logged and written to ``config_history.jsonl``). Every other key defines the experiment (method,
model, data, optimizer, schedule and length, batch, seed, precision): a change is refused with exit code 2,
naming each changed key with its old and new value, unless the command allows it explicitly
(``largessl pretrain --allow-change KEY ...``). An allowed change is recorded in ``config_history.jsonl``
and as an ``event`` record in ``metrics.jsonl`` at the step it applies from, never silently.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largessl.run.layout import CONFIG_HISTORY_FILE

RESTART_SAFE: tuple[str, ...] = (
    "train.run_dir",            # the same folder seen through another mount (a pod's /mnt/runs)
    "train.log_every", "train.collapse_every", "train.max_minutes", "train.lock_lease_seconds",
    "train.device", "train.compile", "train.channels_last", "train.allow_resplit",
    "data.num_workers", "data.prefetch_factor", "data.pin_memory", "data.decode", "data.gpu_decode",
    "data.endpoint_url", "data.retries", "data.retry_backoff_s", "data.val_manifest",
    "method.collective",        # the same numbers through another collective
    "dist.backend", "dist.timeout_minutes", "dist.rendezvous_timeout_minutes", "dist.find_unused_parameters",
    "checkpoint.*", "log.*", "eval.*", "hub.*", "stages", "stages.*",
)
"""Keys a restart may change without ``--allow-change``; ``section.*`` covers every key of a section."""

ABSENT = "<absent>"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key != "stages":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _normalise(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a config from meta.json and one from YAML compare equal."""
    return json.loads(json.dumps(value, default=str))


def matches(key: str, patterns: Iterable[str]) -> bool:
    """``key`` is one of ``patterns``, or lies in a section named by one (``optim`` or ``optim.*``)."""
    for p in patterns:
        p = p.strip()
        base = p[:-2] if p.endswith(".*") else p
        if key == base or key.startswith(base + "."):
            return True
    return False


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every leaf that differs. A key missing from ``old`` whose new value equals its
    default (``defaults``: the new code's defaults) is a field added by an upgrade, not a change."""
    a, b = _flatten(_normalise(old)), _flatten(_normalise(new))
    dflt = _flatten(_normalise(defaults)) if defaults is not None else {}
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va == vb:
            continue
        if va == ABSENT and key in dflt and vb == dflt[key]:
            continue  # a field this version added, at its default
        if vb == ABSENT:
            continue  # a field this version no longer has: it cannot act
        changes[key] = (va, vb)
    return changes


@dataclass
class RestartDecision:
    """What changed between the checkpoint's config and this run's, split by what a restart may change."""

    safe: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Restart-safe keys that changed (logged and recorded)."""
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Experiment-defining keys changed with ``--allow-change`` (recorded in config_history and metrics)."""
    unused_allows: list[str] = field(default_factory=list)
    """``--allow-change`` entries that matched no change."""

    @property
    def changed(self) -> bool:
        """True when anything changed."""
        return bool(self.safe or self.allowed)


def _show(value: Any) -> str:
    return json.dumps(value, default=str)


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``method.name: "barlow_twins" -> "vicreg", train.num_steps: 3 -> 6``."""
    return ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def check_restart(old: Mapping[str, Any], new: Mapping[str, Any], allow: Sequence[str] = (),
                  defaults: Mapping[str, Any] | None = None, where: str = "") -> RestartDecision:
    """Compare the checkpoint's config ``old`` with this run's ``new``; raise ``ValueError`` (exit 2) naming every
    experiment-defining key that changed without being allowed."""
    changes = config_diff(old, new, defaults)
    decision = RestartDecision()
    refused: dict[str, tuple[Any, Any]] = {}
    for key, pair in changes.items():
        if matches(key, RESTART_SAFE):
            decision.safe[key] = pair
        elif matches(key, allow):
            decision.allowed[key] = pair
        else:
            refused[key] = pair
    if refused:
        keys = list(refused)
        if "method.name" in refused:  # another method: its fields differ as a whole
            keys = ["method", *[k for k in keys if not k.startswith("method.")]]
        raise ValueError(
            f"{where or 'the checkpoint'} was trained with another config; a run is one experiment and a restart "
            f"may not change it: {describe(refused)}. Start a new train.run_dir for a new experiment, or rerun "
            f"with --allow-change {' '.join(keys)} to change it on purpose (recorded in {CONFIG_HISTORY_FILE} "
            "and metrics.jsonl). What a restart may change freely (workers, cadences, time limits, endpoints, "
            "timeouts, stages, eval settings) is listed in docs/operations.md")
    used = [a for a in allow if any(matches(k, [a]) for k in decision.allowed)]
    decision.unused_allows = [a for a in allow if a not in used]
    return decision


def history_path(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/config_history.jsonl``."""
    return Path(run_dir) / CONFIG_HISTORY_FILE


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of the run's config history (a torn last line is skipped)."""
    path = history_path(run_dir)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def history_record(decision: RestartDecision, step: int, checkpoint: str, allow: Sequence[str]) -> dict[str, Any]:
    """One line of ``config_history.jsonl``."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": int(step),
            "checkpoint": checkpoint, "host": socket.gethostname(), "allow_change": list(allow),
            "changed": {k: list(v) for k, v in decision.allowed.items()},
            "restart_safe": {k: list(v) for k, v in decision.safe.items()}}


def append_history(run_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> bool:
    """Append ``record`` unless the last record is the same change at the same step (a requeued rerun of the same
    command before its first new checkpoint); returns whether it was written."""
    past = read_history(run_dir)
    if past:
        last = past[-1]
        if all(last.get(k) == record.get(k) for k in ("step", "checkpoint", "changed", "restart_safe")):
            return False
    path = history_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def metrics_event(decision: RestartDecision, step: int) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of an allowed change (no numbers: sinks that plot skip it)."""
    return {"step": int(step), "event": "config_change",
            "changes": {k: {"old": a, "new": b} for k, (a, b) in decision.allowed.items()}}
