"""Progress of long work on rank 0: a tqdm bar on a terminal, plain log lines everywhere else.

Under SLURM or Kubernetes stderr is a file or a log stream, where a bar's ``\\r`` redraws pile up into one
unreadable line. There the same progress comes out as one log line every ``interval_s`` seconds (and one at
the end): step/total, percent, the postfix values (loss, images/s) and the ETA from this process's own rate.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("largessl.progress")

PLAIN_INTERVAL_S = 30.0
"""Default seconds between plain progress lines (``log.progress_every_s`` for pretraining)."""


def format_duration(seconds: float) -> str:
    """``210000`` → ``'2d10h'``, ``3725`` → ``'1h02m'``, ``125`` → ``'2m05s'``, ``7`` → ``'7s'``."""
    s = max(0, int(round(seconds)))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressBar:
    """Progress on rank 0 with ETA and current throughput (disabled elsewhere or when off).

    A tqdm bar when ``stream`` (default stderr) is a terminal; otherwise a plain line through the
    ``largessl.progress`` logger every ``interval_s`` seconds and one when closed.
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "pretrain", *,
                 interval_s: float = PLAIN_INTERVAL_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bar = None
        self.plain = False
        self.total, self.n, self.desc = total, initial, desc
        self.interval_s, self.clock = interval_s, clock
        self.postfix: dict[str, Any] = {}
        if not enabled:
            return
        stream = stream if stream is not None else sys.stderr
        if _is_tty(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            mininterval=1.0, smoothing=0.1, file=stream)
        else:
            self.plain = True
            self._start_n, self._start_t = initial, clock()
            self._last_line = self._start_t

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n``; ``postfix`` (loss, img/s) is shown after the count."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.plain:
            self.n += n
            if postfix:
                self.postfix = postfix
            now = self.clock()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain progress line: ``desc: step n/total (p%) key value ... eta 2m05s``."""
        now = self.clock() if now is None else now
        parts = [f"{self.desc}: step {self.n}/{self.total}"]
        if self.total:
            parts.append(f"({100.0 * self.n / self.total:.0f}%)")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        done, elapsed = self.n - self._start_n, now - self._start_t
        if done > 0 and elapsed > 0 and self.total:
            parts.append(f"eta {format_duration((self.total - self.n) * elapsed / done)}")
        return " ".join(parts)

    def close(self) -> None:
        """Close the bar (or write the last plain line)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.plain:
            self.plain = False
            if self.n > self._start_n:
                log.info("%s", self.line())


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or a stream without isatty
        return False
