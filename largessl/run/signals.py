"""Stop requests (SIGTERM, SIGUSR1, SIGUSR2, time limit) agreed on by every rank at a step boundary.

The handler only records the signal: it never raises, logs or saves inside the handler, so a second signal
arriving while a checkpoint is being written changes nothing but the (already set) flag. The trainer asks
:meth:`StopFlag.agreed` at every step boundary; the local flags are summed over the ranks so that all ranks
stop after the same step, even when the scheduler signalled only one of them.

Cost trade-off: the agreement is one all-reduce of a 2-element tensor per step. On CPU/gloo it is a few
tens of microseconds against steps of tens of milliseconds or more, and checking every step means the
save starts at the first boundary after the signal. On CUDA the trainer checks every ``check_every`` steps
(its log cadence) instead, because ``.item()`` on the reduced flag would sync the GPU stream every step.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import torch
from torch.distributed import ProcessGroup

from largessl.distributed.collectives import all_reduce_sum_no_grad, device_values

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Installs the handlers and answers "should every rank stop now?" (a collective)."""

    def __init__(self, max_minutes: float = 0.0, group: ProcessGroup | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)
        """The training device: the agreement's all-reduce runs there (NCCL has no CPU backend)."""
        self.max_seconds = max_minutes * 60.0
        self.start = time.monotonic()
        self.signum: int | None = None
        self.reason = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        """Register the handlers (main thread only); previous handlers are restored by :meth:`uninstall`."""
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def ignore_further(self) -> None:
        """After the stop checkpoint: ignore further stop signals until exit (SIG_IGN survives interpreter
        shutdown, unlike a Python handler), so the process still ends with the requeue code."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a field assignment: safe at any point, including during a checkpoint write.
        if self.signum is None:
            self.signum = signum

    @property
    def local(self) -> bool:
        """True when this process received a stop signal."""
        return self.signum is not None

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank got a signal or passed the time limit."""
        timed_out = self.max_seconds > 0 and time.monotonic() - self.start >= self.max_seconds
        flags = device_values([1.0 if self.local else 0.0, 1.0 if timed_out else 0.0], self.device)
        all_reduce_sum_no_grad(flags, self.group)
        got_signal, got_time = (v > 0 for v in flags.tolist())  # one device-to-host copy
        if got_signal:
            name = signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
            self.reason = f"received {name}"
        elif got_time:
            self.reason = f"reached train.max_minutes={self.max_seconds / 60:g}"
        return got_signal or got_time
