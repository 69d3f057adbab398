"""State-dict keys independent of how a module was wrapped when it was saved."""

from __future__ import annotations

from collections.abc import Mapping

import torch

COMPILE_PREFIX = "_orig_mod."
"""What ``torch.compile(module)`` inserts in front of every key of the wrapped module."""


def strip_compile_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without ``_orig_mod.`` anywhere in the path (``backbone._orig_mod.conv1.weight`` → ``backbone.conv1.weight``).

    The trainer compiles in place (``nn.Module.compile``), which keeps keys plain, but a checkpoint written
    by a ``torch.compile`` wrapper (an older largessl, a user script) still loads into a plain module and
    into a compiled one.
    """
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state.items()}
