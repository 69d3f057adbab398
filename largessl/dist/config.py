"""Distributed-execution configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistConfig:
    """How ranks talk and how the model is wrapped."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl when CUDA is used, gloo on CPU."""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Data-parallel wrapper: torch DDP or DeepSpeed (install the `deepspeed` extra)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2); only used with strategy=deepspeed."""
    timeout_minutes: float = 4.0
    """Collective timeout: a rank that waits longer in a collective (a peer died or hangs) fails with exit code 3
    instead of hanging; a watchdog ends a rank whose training makes no progress for this plus 1 minute. So the
    survivors of a lost rank exit 3 within 5 minutes by default (see docs/operations.md)."""
    rendezvous_timeout_minutes: float = 30.0
    """How long the ranks wait for each other when the job starts (pods pulling images start minutes apart)."""
    find_unused_parameters: bool = False
    """DDP find_unused_parameters (needed only by unusual method variants)."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"dist.zero_stage must be 0, 1 or 2 (got {self.zero_stage}); stage 3 is not supported")
        if self.timeout_minutes <= 0 or self.rendezvous_timeout_minutes <= 0:
            raise ValueError("dist.timeout_minutes and dist.rendezvous_timeout_minutes must be > 0")
