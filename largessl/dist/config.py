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
    timeout_minutes: float = 30.0
    """Collective timeout; a rank that waits longer raises instead of hanging forever."""
    find_unused_parameters: bool = False
    """DDP find_unused_parameters (needed only by unusual method variants)."""

    def validate(self) -> None:
        """Check values that do not depend on other sections."""
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"dist.zero_stage must be 0, 1 or 2 (got {self.zero_stage}); stage 3 is not supported")
        if self.timeout_minutes <= 0:
            raise ValueError("dist.timeout_minutes must be > 0")
