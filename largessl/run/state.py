"""``<run_dir>/state.json``: how the run's last process is doing or how it ended, for ``largessl status``.

Rank 0 writes it (temp file + rename, so a reader never sees half a file) when training starts and when
:meth:`Trainer.fit <largessl.train.trainer.Trainer.fit>` ends::

    {"state": "running" | "finished" | "requeued" | "failed" | "collapsed", "exit_code": 0 | 75 | 5 | 2 | ... | null,
     "reason": "...", "step": 1200, "num_steps": 500400, "global_batch_size": 2048, "started_at": "...",
     "updated_at": "...", "host": "node12", "pid": 4242, "scheduler": {"slurm_job_id": "...", ...}}

"running" with no live lock (``run.lock``) means the process died without a word (SIGKILL, OOM, node loss):
``largessl status`` reports it as ``died``. Writing it never stops training: a failed write is a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from largessl.run import exit_codes
from largessl.run.layout import STATE_FILE

log = logging.getLogger(__name__)

RUNNING, FINISHED, REQUEUED, FAILED, COLLAPSED = "running", "finished", "requeued", "failed", "collapsed"

_SCHEDULER_ENV = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
                  "slurm_array_task_id": "SLURM_ARRAY_TASK_ID", "slurm_restart_count": "SLURM_RESTART_COUNT",
                  "k8s_job_completion_index": "JOB_COMPLETION_INDEX", "torchelastic_restart_count": "TORCHELASTIC_RESTART_COUNT"}


def utc_now() -> str:
    """Now as ``2026-12-03T07:04:31Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def scheduler_info() -> dict[str, str]:
    """The scheduler's ids from the environment (SLURM job/array ids, the Indexed Job index, restarts)."""
    info = {k: os.environ[v] for k, v in _SCHEDULER_ENV.items() if os.environ.get(v)}
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        info["k8s_pod"] = socket.gethostname()
    return info


def state_for_exit(code: int) -> str:
    """The state a process that exits with ``code`` leaves behind."""
    if code == exit_codes.OK:
        return FINISHED
    if code == exit_codes.COLLAPSED:
        return COLLAPSED
    return REQUEUED if code == exit_codes.REQUEUE else FAILED


def read_state(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's state record, or None when there is none (or it cannot be parsed)."""
    path = Path(run_dir) / STATE_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None
    return record if isinstance(record, dict) else None


def write_state(run_dir: str | os.PathLike[str], **fields: Any) -> None:
    """Merge ``fields`` into the run's state record and write it atomically; warns instead of raising."""
    path = Path(run_dir) / STATE_FILE
    record = read_state(run_dir) or {}
    record.update(fields, updated_at=utc_now())
    tmp = path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("could not write %s (largessl status will not see this update): %s", path, e)


def start_record(step: int, num_steps: int, global_batch_size: int) -> dict[str, Any]:
    """The fields written when training starts (or resumes)."""
    return {"state": RUNNING, "exit_code": None, "reason": "", "step": step, "num_steps": num_steps,
            "global_batch_size": global_batch_size, "started_at": utc_now(), "host": socket.gethostname(),
            "pid": os.getpid(), "scheduler": scheduler_info()}
