"""A sub-command with a bug, plugged into the real CLI table to see how the CLI reports an unexpected error."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    """Fails the way a bug does."""
    shards: list[str] = []
    return len(shards[0])  # IndexError
