"""Probes for tests that run real training processes: what each rank received and trained on, recorded to a file.

Nothing here changes what is trained. A test process started by :mod:`train_procs` calls :func:`install`,
which reads two environment variables:

``LARGESSL_TEST_RECORD_DIR``
    This rank appends JSON lines to ``DIR/rank-<R>.jsonl``: ``{"event": "signal", "signal": "SIGUSR1"}``
    for every signal the *kernel delivered to this process* (observed with ``signal.set_wakeup_fd``, which
    the C-level handler writes to whatever Python handler the trainer installed, so the record is
    independent of the trainer's signal code); ``{"event": "batch", "epoch", "batch", "step", "keys"}`` for
    every batch the stream hands to the trainer (``step`` is the 1-based optimizer step it is trained in);
    ``{"event": "exit", "code", "reason"}`` at the end. Each line also carries ``pid`` and ``rank``.
``LARGESSL_TEST_HOLD_AFTER_STEP``
    The stream does not hand out the batch of any later step: the process waits there (to be SIGKILLed by
    the test), so a kill drawn at step K always lands before the run could complete.
``LARGESSL_TEST_GATES``
    ``STEP:PATH[,STEP:PATH...]``: the stream hands out the batch of ``STEP`` only once ``PATH`` exists (a
    ``{"event": "gate", "step"}`` record says it is waiting). The test creates the file when the world is where
    it wants it (a node killed, a stop signal delivered); once it exists, later processes pass straight through.

Every record also carries ``world`` (``WORLD_SIZE``, or ``LARGESSL_WORLD_SIZE`` in a one-process pod), so a run
whose world changes under an elastic launcher (torchrun's restarts) shows which world each process trained in.
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Recorder:
    """Appends this rank's events to ``rank-<R>.jsonl`` (one flushed line each, so a SIGKILL loses at most one)."""

    def __init__(self, directory: Path, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.world = int(os.environ.get("WORLD_SIZE", os.environ.get("LARGESSL_WORLD_SIZE", "1")))
        self._lock = threading.Lock()
        self._f = open(directory / f"rank-{rank}.jsonl", "a")

    def write(self, event: str, **fields: Any) -> None:
        """One record."""
        line = json.dumps({"event": event, "pid": os.getpid(), "rank": self.rank, "world": self.world,
                           **fields})
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()


class SignalWatcher:
    """Records every signal delivered to this process (those with a Python-level handler), from a thread."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._r, w = os.pipe()
        os.set_blocking(w, False)
        os.set_blocking(self._r, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signal-watcher", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            data = os.read(self._r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            self.recorder.write("signal", signal=signal.Signals(signum).name)

    def _run(self) -> None:
        while not self._stop.is_set():
            if select.select([self._r], [], [], 0.05)[0]:
                self._drain()
        self._drain()

    def close(self) -> None:
        """Record what is still in the pipe, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout=5)


class RecordingStream:
    """Passes every attribute through to the real stream; ``iterate`` also records each batch's sample keys."""

    def __init__(self, stream: Any, recorder: Recorder | None, hold_after_step: int | None,
                 gates: dict[int, Path] | None = None) -> None:
        self._stream = stream
        self._recorder = recorder
        self._hold = hold_after_step
        self._gates = gates or {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def iterate(self, epoch: int, start_batch: int = 0, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """The real stream's batches of ``epoch`` from ``start_batch``, recorded as they are handed out."""
        per_epoch = self._stream.batches_per_epoch
        for i, batch in enumerate(self._stream.iterate(epoch, start_batch, *args, **kwargs)):
            step = epoch * per_epoch + start_batch + i + 1
            if self._hold is not None and step > self._hold:
                if self._recorder:
                    self._recorder.write("hold", step=step)
                while True:  # the test SIGKILLs this process now
                    time.sleep(1)
            gate = self._gates.get(step)
            if gate is not None and not gate.exists():
                if self._recorder:
                    self._recorder.write("gate", step=step)
                while not gate.exists():
                    time.sleep(0.05)
            if self._recorder:
                self._recorder.write("batch", epoch=epoch, batch=start_batch + i, step=step, keys=list(batch.keys))
            yield batch


class Probes:
    """What :func:`install` set up for this process."""

    def __init__(self) -> None:
        # a one-process Kubernetes pod has no RANK: its rank is the Job's completion index
        rank = int(os.environ.get("RANK", os.environ.get("JOB_COMPLETION_INDEX", "0")))
        directory = os.environ.get("LARGESSL_TEST_RECORD_DIR")
        hold = os.environ.get("LARGESSL_TEST_HOLD_AFTER_STEP")
        self.recorder = Recorder(Path(directory), rank) if directory else None
        self.hold = int(hold) if hold else None
        self.gates = {int(step): Path(path) for step, _, path in
                      (g.partition(":") for g in os.environ.get("LARGESSL_TEST_GATES", "").split(",") if g)}
        self.watcher = SignalWatcher(self.recorder) if self.recorder else None

    def wrap(self, stream: Any) -> Any:
        """The stream, recording (and holding) when the environment asks for it."""
        if self.recorder is None and self.hold is None and not self.gates:
            return stream
        return RecordingStream(stream, self.recorder, self.hold, self.gates)

    def finish(self, code: int, reason: str = "") -> None:
        """Record the exit code (and, where known, the trainer's reason)."""
        if self.watcher:
            self.watcher.close()
        if self.recorder:
            self.recorder.write("exit", code=code, reason=reason)


def install() -> Probes:
    """Set up this process's probes from the environment (call first thing in the main thread)."""
    return Probes()


def read_records(directory: Path, rank: int) -> list[dict[str, Any]]:
    """The records of ``rank`` in order (a line torn by a SIGKILL is skipped)."""
    path = directory / f"rank-{rank}.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
