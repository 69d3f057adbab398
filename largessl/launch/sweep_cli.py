"""``largessl sweep slurm|k8s|local|status|member``: run a grid of overrides as one job array (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sweep_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept config key and its values (repeatable: the members are every combination)")
    g.add_argument("--seeds", type=int, default=1,
                   help="run every grid point with train.seed 0..N-1 (status shows mean ± SE over them)")
    g.add_argument("--dir", required=True, help="the sweep's directory: sweep.json and one run directory per member")
    g.add_argument("--parallel", type=int, default=64, help="at most this many members run at once")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``largessl sweep``."""
    from largessl.launch.cli import add_k8s_arguments, add_slurm_arguments

    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    s = sub.add_parser("slurm", help="submit the members as one SLURM job array (each requeued and resumed)")
    add_slurm_arguments(s, stage_jobs=False)
    _sweep_options(s)
    k = sub.add_parser("k8s", help="render (and --apply) one Indexed Job whose completion index selects the member")
    add_k8s_arguments(k)
    _sweep_options(k)
    lo = sub.add_parser("local", help="run the members here, one after another")
    lo.add_argument("--config", action="append", default=[], help="config file (repeatable; later wins)")
    lo.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                    help="passed to `largessl pretrain` of every member")
    lo.add_argument("--restart-from-scratch", action="store_true", help="passed to `largessl pretrain`")
    lo.add_argument("overrides", nargs="*", help="dotted config overrides for every member")
    _sweep_options(lo)
    st = sub.add_parser("status", help="the members' states and final kNN/linear numbers, and a plot")
    st.add_argument("sweep_dir", metavar="DIR", help="the sweep's --dir")
    st.add_argument("--plot", default=None, metavar="PNG", help="where the plot goes (default DIR/sweep.png)")
    st.add_argument("--x", default=None, metavar="KEY", help="the swept key on the plot's x axis (default: the first)")
    st.add_argument("--json", action="store_true", help="the rows as JSON instead of the table")
    st.add_argument("--no-scheduler", action="store_true", help="do not ask SLURM about the members' jobs")
    m = sub.add_parser("member", help="(in a sweep's pod) run a command with one member's overrides appended")
    m.add_argument("--members", required=True, help="the sweep's members.json (from its ConfigMap)")
    m.add_argument("--index", type=int, default=None,
                   help="the member (default LARGESSL_SWEEP_INDEX, JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID)")
    m.add_argument("command", nargs=argparse.REMAINDER, help="-- then a largessl command line, e.g. -- pretrain ...")


def _plan(args: argparse.Namespace, member_base: str | None = None):
    from largessl.launch.sweep import plan_sweep

    return plan_sweep(args.dir, args.config, list(args.overrides), args.grid, args.seeds, args.target,
                      member_base=member_base)


def _run_slurm(args: argparse.Namespace) -> int:
    from largessl.launch import sweep as sw
    from largessl.launch.cli import slurm_request

    args.dir = str(Path(args.dir).resolve())
    plan = _plan(args)
    plans = sw.plan_slurm(plan, lambda overrides: slurm_request(args, overrides, submit_stages=False))
    if args.dry_run:
        print(sw.render_array_sbatch(plans, args.parallel))
        for m, p in zip(plan.members, plans):
            print(f"# task {m.index}: largessl {' '.join(p.pretrain_argv)}")
        return 0
    sw.record(plan)
    plan = sw.submit_slurm(plan, plans, args.parallel)
    print(f"submitted SLURM job array {plan.job['slurm_job_id']} ({len(plans)} members, at most "
          f"{min(args.parallel, len(plans))} at once)")
    print(f"  sweep dir: {plan.dir}")
    print(f"  logs:      {plan.job['folder']}")
    print(f"  status:    largessl sweep status {plan.dir}")
    sys.stdout.flush()
    return 0


def _run_k8s(args: argparse.Namespace) -> int:
    from largessl.launch import k8s
    from largessl.launch import sweep as sw
    from largessl.launch.cli import k8s_request

    plan = _plan(args)
    manifests = sw.plan_k8s(plan, k8s_request(args), args.parallel)
    text = k8s.to_yaml(manifests)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.yaml").write_text(text)
        print(f"wrote {out / 'sweep.yaml'}")
    elif not args.apply:
        print(text, end="")
    if args.apply:
        sw.record(plan)
        print(k8s.apply(manifests), end="")
        print(f"job {plan.job['k8s_job']}: {len(plan.members)} members under {plan.job['run_dir']} on the volume; "
              f"`largessl sweep status` reads a copy of it with {sw.SWEEP_FILE} (written to {plan.dir})")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from largessl.launch import sweep as sw
    from largessl.launch.cli import _pretrain_flags

    args.dir = str(Path(args.dir).resolve())
    plan = sw.record(_plan(args))
    codes = sw.run_local(plan, _pretrain_flags(args))
    failed = {i: c for i, c in codes.items() if c}
    print(f"sweep {plan.dir}: {len(codes) - len(failed)}/{len(codes)} members finished; "
          f"`largessl sweep status {plan.dir}` for the table and plot")
    return next(iter(failed.values()), 0)


def _run_status(args: argparse.Namespace) -> int:
    from largessl.launch.sweep import load_sweep
    from largessl.launch.sweep_report import PLOT_FILE, format_report, member_rows, plot

    sweep = load_sweep(args.sweep_dir)
    rows = member_rows(sweep, scheduler=not args.no_scheduler)
    png = plot(sweep, rows, args.plot or Path(args.sweep_dir) / PLOT_FILE, args.x)
    if args.json:
        sys.stdout.write(json.dumps({"sweep": sweep.to_dict(), "members": rows, "plot": png}, indent=1) + "\n")
    else:
        print(format_report(sweep, rows))
        print(f"\nplot: {png}" if png else "\nplot: none yet (no member has an eval result)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry of ``largessl sweep``."""
    if args.target == "member":
        from largessl.launch.sweep import run_member

        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return run_member(args.members, command, args.index)
    return {"slurm": _run_slurm, "k8s": _run_k8s, "local": _run_local, "status": _run_status}[args.target](args)
