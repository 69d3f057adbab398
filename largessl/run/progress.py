"""Progress of long work on rank 0: a tqdm bar with ETA and throughput."""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """A tqdm bar on rank 0 with ETA and current throughput (disabled elsewhere or when off)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "pretrain") -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            mininterval=1.0, smoothing=0.1)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance the bar; ``postfix`` (loss, img/s) is shown after it."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
