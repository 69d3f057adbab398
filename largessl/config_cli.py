"""``largessl config``: print the resolved config (defaults < files < overrides) as YAML; ``--check`` also runs
the submit-time checks of the launchers (``largessl.run.preflight``) for a job of the given size."""

from __future__ import annotations

import argparse

from largessl.config import config_to_yaml, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``largessl config``."""
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later wins)")
    p.add_argument("--check", action="store_true",
                   help="run the submit-time checks (batch vs world size, manifests, val set for the stages, write "
                        "access to the run and checkpoint storage) instead of printing; exit 2 naming each problem")
    p.add_argument("--nodes", type=int, default=1, help="with --check: nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=0, help="with --check: GPUs (processes) per node; 0 = CPU")
    p.add_argument("--tasks-per-node", type=int, default=1, help="with --check: processes per CPU node")
    p.add_argument("--offline", action="store_true",
                   help="with --check: skip what reads data or writes storage (for a machine that cannot reach it)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=0.3")


def run(args: argparse.Namespace) -> int:
    """Print the resolved config, or check it."""
    cfg = load_config(args.config, args.overrides)
    if not args.check:
        print(config_to_yaml(cfg), end="")
        return 0
    from largessl.run.preflight import preflight

    if args.nodes < 1 or args.gpus_per_node < 0 or args.tasks_per_node < 1:
        raise ValueError("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
    world = args.nodes * (args.gpus_per_node or args.tasks_per_node)
    report = preflight(cfg, world, data=not args.offline, storage=not args.offline,
                       what=f"a job of {world} process(es)")
    for line in report.checked:
        print(f"ok: {line}")
    print(f"config OK for {args.nodes} node(s) x {args.gpus_per_node or args.tasks_per_node} process(es)"
          f"{' (offline: data and storage not checked)' if args.offline else ''}")
    return 0
