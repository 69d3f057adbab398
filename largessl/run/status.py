"""``largessl status``: where each run is, read from its run directory alone.

Everything comes from files the run writes (so it works the same for local, SLURM and Kubernetes runs, and on a
copy of the run directory): ``state.json`` (how the last process is doing or ended), ``run.lock`` (is it alive),
``pretrain-complete.json``, the tail of ``metrics.jsonl`` (loss, images/s, data wait, skips, collapse metrics)
and the newest ``checkpoints/step-N/``. ``metrics.jsonl`` is read backwards from its end, so a week-long run's
file costs a few kilobytes, not its size.

States: ``running`` (the lock is live), ``finished``, ``requeued`` (stopped on a signal after a save: exit 75,
the scheduler restarts it), ``failed`` (with the exit code and the one-line reason), ``collapsed`` (stopped by the
collapse guard, exit 5), ``died`` (the last process
left ``running`` behind but holds no live lock: SIGKILL, OOM or node loss; a requeue resumes it), ``not started``.
A run started under SLURM also shows its job's state (``scontrol show job``, else ``sacct``): a requeued run
``PENDING`` in the queue, a ``died`` one whose job is ``NODE_FAIL``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from largessl.run.completion import read_marker
from largessl.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, STATE_FILE
from largessl.run.lock import lock_status
from largessl.run.progress import format_duration
from largessl.run.state import COLLAPSED, FAILED, FINISHED, REQUEUED, RUNNING, read_state

COLLAPSE_PREFIX = "collapse/"
_TAIL_CHUNK = 64 * 1024


def is_run_dir(path: Path) -> bool:
    """A folder a pretraining run wrote: its config and its state or metrics."""
    return (path / CONFIG_FILE).is_file() and ((path / STATE_FILE).is_file() or (path / METRICS_FILE).is_file())


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Every run directory at or below ``root`` (not descending into a run's own folders), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--root {root} is not a directory")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames[:] = []  # checkpoints/, tb/, eval/ hold no runs
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def tail_records(path: Path, want: tuple[str, ...] = ("loss", COLLAPSE_PREFIX), max_bytes: int = 8 << 20
                 ) -> dict[str, dict[str, Any]]:
    """The newest record of ``metrics.jsonl`` holding each key in ``want`` (a key ending in ``/`` matches any
    key with that prefix), reading backwards from the end in 64 KiB chunks, at most ``max_bytes``."""
    found: dict[str, dict[str, Any]] = {}
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return found
    with f:
        end = f.seek(0, os.SEEK_END)
        pos, carry = end, b""
        while pos > 0 and len(found) < len(want) and end - pos < max_bytes:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + carry
            lines = block.split(b"\n")
            carry = lines.pop(0) if pos > 0 else b""  # a line cut at the chunk start, completed by the next read
            for line in reversed(lines):
                _match(line, want, found)
        if pos == 0 and carry:
            _match(carry, want, found)
    return found


def _match(line: bytes, want: tuple[str, ...], found: dict[str, dict[str, Any]]) -> None:
    line = line.strip()
    if not line:
        return
    try:
        rec = json.loads(line)
    except ValueError:
        return  # a line being written right now
    if not isinstance(rec, dict) or "step" not in rec:
        return
    for key in want:
        if key in found:
            continue
        if (key.endswith("/") and any(k.startswith(key) for k in rec)) or key in rec:
            found[key] = rec


def newest_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The newest complete ``step-N/`` in the run's local checkpoint folder: its step and age in seconds; for a
    remote ``checkpoint.dir`` only the URL (status reads local files only)."""
    ckpt_dir = (config.get("checkpoint") or {}).get("dir") or ""
    if "://" in str(ckpt_dir) and not str(ckpt_dir).startswith("file://"):
        return {"url": ckpt_dir}
    folder = Path(str(ckpt_dir).removeprefix("file://")) if ckpt_dir else run_dir / CHECKPOINTS_DIR
    steps = []
    try:
        for entry in os.scandir(folder):
            if entry.name.startswith("step-") and (Path(entry.path) / "COMPLETE.json").is_file():
                try:
                    steps.append((int(entry.name[5:]), Path(entry.path)))
                except ValueError:
                    continue
    except OSError:
        return None
    if not steps:
        return None
    step, path = max(steps)
    return {"step": step, "path": str(path), "age_s": max(0.0, time.time() - (path / "COMPLETE.json").stat().st_mtime)}


def slurm_job(job_id: str, timeout_s: float = 20.0) -> dict[str, Any] | None:
    """The SLURM job's state and restart count from ``scontrol show job`` (no accounting database needed; SLURM
    keeps a finished job for ``MinJobAge``, 300 s by default), else ``sacct``; None without SLURM's commands."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                                 timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            res = None
        if res is not None and res.returncode == 0:
            state = re.search(r"\bJobState=(\S+)", res.stdout)
            restarts = re.search(r"\bRestarts=(\d+)", res.stdout)
            return {"job_id": str(job_id), "state": state.group(1) if state else "UNKNOWN",
                    "restarts": int(restarts.group(1)) if restarts else None, "source": "scontrol"}
    if shutil.which("sacct"):
        try:
            res = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True,
                                 text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            return None
        lines = [x for x in res.stdout.split() if x]
        if res.returncode == 0 and lines:
            return {"job_id": str(job_id), "state": lines[-1], "restarts": None, "source": "sacct"}
    return None


def _slurm_id(scheduler: dict[str, Any]) -> str:
    """The job id people use: ``<array>_<task>`` for a job array's task (its SLURM_JOB_ID is another number)."""
    array, task = scheduler.get("slurm_array_job_id"), scheduler.get("slurm_array_task_id")
    return f"{array}_{task}" if array and task is not None and task != "" else str(scheduler["slurm_job_id"])


def run_status(run_dir: str | os.PathLike[str], scheduler: bool = True) -> dict[str, Any]:
    """Everything ``largessl status`` shows of one run, as a JSON-ready dict (``scheduler``: also ask SLURM about
    the job recorded in state.json, when its commands are here)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory")
    if not is_run_dir(run_dir):
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG_FILE} with {STATE_FILE} or {METRICS_FILE})")
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {run_dir / CONFIG_FILE}: {e}") from e
    state = read_state(run_dir) or {}
    lock = lock_status(run_dir)
    marker = read_marker(run_dir)
    tails = tail_records(run_dir / METRICS_FILE)
    last = tails.get("loss", {})
    collapse_rec = tails.get(COLLAPSE_PREFIX, {})
    num_steps = state.get("num_steps") or (marker or {}).get("num_steps")
    step = max(int(last.get("step", 0)), int(state.get("step") or 0))
    recorded = state.get("state")
    if lock == "running":
        shown = RUNNING
    elif recorded == RUNNING:
        shown = "died"
    elif recorded in (FINISHED, REQUEUED, FAILED, COLLAPSED):
        shown = recorded
    elif marker is not None:
        shown = FINISHED
    else:
        shown = "not started" if not last else "unknown"
    batch = state.get("global_batch_size") or (config.get("train") or {}).get("global_batch_size")
    ips = last.get("images_per_s")
    eta_s = None
    if shown == RUNNING and num_steps and ips and batch:
        eta_s = max(0, num_steps - step) * batch / ips
    return {
        "run_dir": str(run_dir),
        "state": shown,
        "exit_code": state.get("exit_code"),
        "reason": state.get("reason", ""),
        "method": (config.get("method") or {}).get("name"),
        "arch": (config.get("model") or {}).get("arch"),
        "step": step,
        "num_steps": num_steps,
        "epoch": last.get("epoch"),
        "loss": last.get("loss"),
        "images_per_s": ips,
        "eta_s": eta_s,
        "data_wait_frac": last.get("data_wait_frac"),
        "skipped_samples": last.get("skipped_samples"),
        "skipped_shards": last.get("skipped_shards"),
        "checkpoint": newest_checkpoint(run_dir, config),
        "collapse": {k[len(COLLAPSE_PREFIX):]: v for k, v in collapse_rec.items() if k.startswith(COLLAPSE_PREFIX)},
        "collapse_step": collapse_rec.get("step"),
        "updated_at": state.get("updated_at"),
        "scheduler": state.get("scheduler", {}),
        "slurm": (slurm_job(_slurm_id(state["scheduler"]))
                  if scheduler and (state.get("scheduler") or {}).get("slurm_job_id") else None),
        "lock": lock,
    }


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A table for people: one line per run, then one line per failed run with its reason."""
    header = ["run", "state", "step", "epoch", "loss", "img/s", "ETA", "checkpoint", "wait", "skipped", "collapse"]
    body = []
    for r in rows:
        state = r["state"] + (f" ({r['exit_code']})" if r["state"] in (FAILED, REQUEUED, COLLAPSED) else "")
        if r.get("slurm"):
            state += f", slurm {r['slurm']['job_id']} {r['slurm']['state']}"
        step = f"{r['step']}/{r['num_steps']}" if r["num_steps"] else str(r["step"])
        ck = r["checkpoint"]
        if ck is None:
            ck_text = "-"
        elif "url" in ck:
            ck_text = "remote"
        else:
            ck_text = f"step {ck['step']}, {format_duration(ck['age_s'])} ago"
        c = r["collapse"]
        col = (f"std {c['std']:.2g} rankme {c.get('rankme', float('nan')):.3g}" if "std" in c else "-")
        body.append([r["run_dir"], state, step, _num(r["epoch"], ".1f"), _num(r["loss"], ".4g"),
                     _num(r["images_per_s"], ".0f"), format_duration(r["eta_s"]) if r["eta_s"] is not None else "-",
                     ck_text, _num(r["data_wait_frac"] and 100 * r["data_wait_frac"], ".0f") + "%"
                     if r["data_wait_frac"] is not None else "-",
                     _num(r["skipped_samples"], "d"), col])
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in [header, *body]]
    for r in rows:
        if r["state"] in (FAILED, COLLAPSED, "died") and (r["reason"] or r["state"] == "died"):
            why = r["reason"] or "the last process ended without a word (SIGKILL, OOM or node loss); a restart resumes"
            lines.append(f"{r['run_dir']}: {why}")
    return "\n".join(lines)
