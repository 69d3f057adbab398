"""``largessl config``: print the resolved config (defaults < files < overrides) as YAML."""

from __future__ import annotations

import argparse

from largessl.config import config_to_yaml, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl config``."""
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=0.3")


def run(args: argparse.Namespace) -> int:
    """Print the resolved config."""
    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
