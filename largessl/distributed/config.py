"""Distributed-execution configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DistConfig:
    """How ranks talk and how the model is wrapped."""

    backend: str = "auto"
    """Process-group backend: auto (= cpu:gloo,cuda:nccl on GPU, gloo on CPU), gloo, nccl (also gets the
    cpu:gloo safety net), or an explicit device map such as cuda:nccl or cuda:gloo (a group without a CPU
    backend, as the GPU test tier uses to catch CPU tensors handed to collectives)."""
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
        from largessl.distributed.env import parse_backend

        parse_backend(self.backend)
        if self.timeout_minutes <= 0 or self.rendezvous_timeout_minutes <= 0:
            raise ValueError("dist.timeout_minutes and dist.rendezvous_timeout_minutes must be > 0")
