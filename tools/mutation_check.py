"""``python tools/mutation_check.py``: flip one core invariant at a time and check that named tests fail.

Each mutation is a one-place edit of the source, applied to a temporary copy of this checkout (tracked and
untracked-but-not-ignored files, as they are on disk; this checkout is never touched). For each one the
named tests run in the copy; the mutation is *caught* when pytest reports at least one of them failed.
First the named tests run on the unmutated copy and must all pass, so a failure is the mutation's doing.

    python tools/mutation_check.py                      # all mutations, with the baseline run
    python tools/mutation_check.py --only dbn_permutation_per_rank --no-baseline
    python tools/mutation_check.py --list

Exit status: 0 when every mutation was caught, 1 otherwise (or when a mutation no longer applies: its
source text changed, so the mutation must be updated to the new code). Not part of ``make test``: it runs
the slow distributed tests several times (about 10-15 minutes on 2 cores). Results: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """A one-place source edit that breaks an invariant, and the tests that must notice."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "bt_c_over_per_rank_batch",
        "Barlow Twins divides C by the per-rank batch instead of the real global N",
        "largessl/methods/barlow_twins.py",
        "    return global_gram(a, b, group, collective) / n\n",
        "    return global_gram(a, b, group, collective) / z_a.shape[0]\n",
        ("tests/distributed/test_invariance.py", "tests/unit/test_methods.py::test_barlow_twins_equals_algorithm_1"),
    ),
    Mutation(
        "all_reduce_sum_without_autograd",
        "all_reduce_sum uses the non-autograd dist.all_reduce: the value is the sum, the gradient only the "
        "local term (backward no longer sums over ranks)",
        "largessl/distributed/collectives.py",
        "    return _AllReduceSum.apply(x, group)\n",
        "    total = x.detach().clone()\n"
        "    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)\n"
        "    return x + (total - x).detach()\n",
        ("tests/distributed/test_collectives.py", "tests/distributed/test_invariance.py"),
    ),
    Mutation(
        "dbn_permutation_per_rank",
        "Shuffled-DBN's permutation is seeded with the rank too, so ranks permute differently",
        "largessl/nn/whitening.py",
        "    gen = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(step)) % (2**63))\n",
        "    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0\n"
        "    gen = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(step) + rank) % (2**63))\n",
        ("tests/distributed/test_invariance.py",
         "tests/unit/test_methods.py::test_shuffled_dbn_views_share_a_permutation_without_a_step"),
    ),
    Mutation(
        "skip_data_position_save",
        "checkpoints no longer store the data position (each rank's state has no 'data' entry)",
        "largessl/train/trainer.py",
        '        rank_state = {"rng": capture_rng_state(), "data": self._data_position(), "rank": self.rank}\n',
        '        rank_state = {"rng": capture_rng_state(), "rank": self.rank}\n',
        ("tests/unit/test_train.py", "tests/distributed/test_resume.py"),
    ),
    Mutation(
        "stream_resume_replays_consumed_samples",
        "on resume each loader worker starts its epoch order from the beginning instead of dropping the "
        "samples of batches already trained (right count of batches, wrong samples)",
        "largessl/data/stream.py",
        "    order = order[done * batch_size:]\n",
        "    order = order[:len(order) - done * batch_size]\n",
        ("tests/distributed/test_resume.py",),
    ),
    Mutation(
        "stop_without_agreement",
        "StopFlag.agreed() stops only the rank that got the signal (no all-reduce of the flags)",
        "largessl/run/signals.py",
        "        all_reduce_sum_no_grad(flags, self.group)\n",
        "        pass  # no agreement across ranks\n",
        ("tests/distributed/test_signals.py",),
    ),
    Mutation(
        "ddp_buckets_unsettled",
        "no settle pass: each process start's first step reduces through DDP's initial gradient buckets, so a "
        "resumed 3-rank run sums in another order than one that never stopped",
        "largessl/train/trainer.py",
        "        if not self._buckets_settled:\n            self._settle_buckets(batch.views)\n",
        "",
        ("tests/distributed/test_resume.py::test_sigkill_and_restart_is_bitwise_identical[3-0]",),
    ),
)


@dataclass
class Outcome:
    """What pytest said about one mutation (or the baseline)."""

    returncode: int
    failed: list[str]
    seconds: float
    log: Path


def copy_checkout(dest: Path) -> None:
    """Copy tracked and untracked-not-ignored files of this checkout (as on disk) to ``dest``."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    for rel in sorted(set(out.stdout.decode().split("\0")) - {""}):
        src = ROOT / rel
        if src.is_file():  # skips files deleted in the work tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _failed_ids(junit: Path) -> list[str]:
    if not junit.exists():
        return []
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    return failed


def run_tests(tree: Path, tests: tuple[str, ...], label: str, work: Path) -> Outcome:
    """Run ``tests`` with pytest in ``tree``; the log and JUnit report go to ``work``."""
    junit, log = work / f"{label}.xml", work / f"{label}.log"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    env.pop("LARGESSL_SKIP_REPORT", None)
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                             *tests], cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return Outcome(rc, _failed_ids(junit), time.monotonic() - t0, log)


def apply(tree: Path, m: Mutation) -> str:
    """Write the mutated file into ``tree``; returns the original text (raises when the mutation no longer applies)."""
    path = tree / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise LookupError(f"mutation {m.name} does not apply: {m.path} contains the text it replaces "
                          f"{text.count(m.old)} times (expected once); update MUTATIONS to the current code")
    path.write_text(text.replace(m.old, m.new))
    return text


def table(rows: list[tuple[Mutation, Outcome | None, str]]) -> str:
    """Markdown table of the results."""
    lines = ["| mutation | what it breaks | file | caught | failing named tests | time |",
             "|---|---|---|---|---|---|"]
    for m, out, note in rows:
        if out is None:
            lines.append(f"| `{m.name}` | {m.what} | `{m.path}` | **no** | {note} | - |")
            continue
        caught = out.returncode == 1 and bool(out.failed)
        tests = "<br>".join(f"`{t}`" for t in out.failed) or note or f"none (pytest exit {out.returncode})"
        lines.append(f"| `{m.name}` | {m.what} | `{m.path}` | {'yes' if caught else '**no**'} | {tests} | "
                     f"{out.seconds:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the mutations; print the table; 0 when every one was caught."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the named tests without mutation")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and logs")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, then exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        p.error(f"unknown mutation(s) {sorted(unknown)}; known: {', '.join(m.name for m in MUTATIONS)}")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.path}; tests: {' '.join(m.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="largessl-mutation-"))
    tree = work / "tree"
    copy_checkout(tree)
    print(f"copy of {ROOT} in {tree}", flush=True)
    try:
        for m in chosen:  # fail fast, before any test runs, when a mutation no longer applies
            apply(tree, m)
            shutil.copy2(ROOT / m.path, tree / m.path)
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: {len(union)} test target(s) without mutation ...", flush=True)
            base = run_tests(tree, union, "baseline", work)
            if base.returncode != 0:
                print(f"the named tests fail WITHOUT any mutation (exit {base.returncode}): {base.failed}; "
                      f"fix them first (log: {base.log})", file=sys.stderr)
                args.keep = True
                return 1
            print(f"baseline passed in {base.seconds:.0f} s", flush=True)
        rows: list[tuple[Mutation, Outcome | None, str]] = []
        for m in chosen:
            print(f"{m.name}: {m.what} ...", flush=True)
            original = apply(tree, m)
            try:
                out = run_tests(tree, m.tests, m.name, work)
            finally:
                (tree / m.path).write_text(original)
            note = "" if out.returncode in (0, 1) else f"pytest exit {out.returncode}: see {out.log}"
            rows.append((m, out, note))
            verdict = "caught" if out.returncode == 1 and out.failed else "NOT caught"
            print(f"  {verdict} in {out.seconds:.0f} s by {out.failed or '-'}", flush=True)
    except LookupError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    missed = [m.name for m, out, _ in rows if out is None or not (out.returncode == 1 and out.failed)]
    if missed:
        print(f"\nNOT caught: {', '.join(missed)}: write the test that catches each", file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} mutation(s) caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
