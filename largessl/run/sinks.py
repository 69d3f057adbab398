"""Metric sinks (rank 0 only): metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

from largessl.run.durable import storage_error

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    """Receives one flat record of numbers per logged step."""

    def write(self, record: dict[str, Any]) -> None:
        """Record the metrics of one logged step."""

    def close(self) -> None:
        """Flush and release files."""


class JsonlSink:
    """One JSON object per logged step, flushed line by line so a killed run loses at most one line.

    On resume :meth:`truncate_after` drops lines of steps beyond the checkpoint, so with ``log_every=1``
    every step appears exactly once across any number of restarts.
    """

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.truncate_after(resume_step or 0)
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:  # a full disk names the file (an OSError from write() carries no path)
            raise storage_error(e, self.path) from e

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (and drop a torn last line), rewriting atomically."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn line from a killed process
            if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        try:
            self._f.write(json.dumps(record, sort_keys=False) + "\n")
            self._f.flush()
        except OSError as e:
            raise storage_error(e, self.path) from e

    def close(self) -> None:
        """Close the file."""
        try:
            self._f.close()
        except OSError as e:
            raise storage_error(e, self.path) from e


class TensorBoardSink:
    """Every numeric field of a record becomes a scalar at ``record['step']``."""

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run wrote beyond the resumed step.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Add scalars for every number in ``record``."""
        step = int(record["step"])
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        """Flush event files."""
        self.writer.flush()
        self.writer.close()
