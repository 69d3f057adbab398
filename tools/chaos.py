#!/usr/bin/env python3
"""A chaos run: one seeded pretraining on 2-4 ranks, many faults of different kinds, and proof nothing was lost.

    python tools/chaos.py --out /tmp/chaos --faults 32 --seed 0            # docs/reliability.md's table
    python tools/chaos.py --out /tmp/chaos --faults 8 --seed 0             # the CI test (tests/integration)

It starts its own S3 server (SeaweedFS, tests/servers.py, 127.0.0.1 only) holding the data (16-px digits
shards) and the checkpoints, and a small tmpfs as the run directory (root only: the full-disk fault needs a
volume of its own). Then it trains one run and injects faults from a schedule drawn with ``--seed``:

==========  =========================================================================================
sigkill     SIGKILL of one rank
sigterm     SIGTERM to every rank (a scheduler's preemption): they agree, save and exit 75
sigstop     SIGSTOP of one rank (a frozen node); once its peers have exited, the scheduler kills it
s3_read     the S3 server killed for 2-6 s just after a checkpoint step, while the ranks stream shards
s3_save     the S3 server killed for 5-12 s just before a checkpoint step
disk_full   the run directory filled up (metrics, run config); freed once the job exits or after 40 steps
corrupt     SIGTERM, then the newest checkpoint's weights overwritten with garbage of the same size
world       SIGTERM, then the job restarts on another world size (``--worlds``)
==========  =========================================================================================

After each fault the tool waits for the job's processes to end and starts the job again, as SLURM's requeue
or a Job controller would (a fault the job survives needs no restart). Every rank records, per process, each
batch it was handed (step, epoch, sample keys, skip counters) and each checkpoint it saved (a ledger, under
``--out``). At the end it checks, from the ledger and the checkpoints:

- the lineage: the final process resumed from a checkpoint that an earlier one saved, and so on back to
  step 0; along it every step was trained exactly once, each with the full global batch;
- no sample twice in an epoch and none skipped (``skipped_samples``/``skipped_shards`` stay 0);
- every step's batch holds the same sample keys as in an undisturbed reference run, and the final weights and
  optimizer state are **bitwise** equal to that run's. The reference changes world size at the same steps as
  the chaos run's lineage did (a world-size change re-splits the data, so batches after it differ from a run
  that never changed; against the same split the arithmetic is identical, so equality is exact).

It writes ``chaos.md`` (a table: fault, when, exit codes, where the job resumed, steps redone, time lost) and
``chaos.json`` to ``--out`` and exits 0 only when nothing was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sigkill", "sigterm", "sigstop", "s3_read", "s3_save", "disk_full", "corrupt", "world")
GLOBAL_BATCH = 24  # divisible by 2, 3 and 4 ranks
SAVE_EVERY = 5
STEPS_PER_FAULT = 3  # the run's length per fault beyond its gap: a save step's alignment (s3_save)
TAIL_STEPS = 25
JOB_TIMEOUT_S = 600.0
RUN_DIR_MB = 4

BASE = ["model.arch=repro_convnet", "method.projector=32-32", "data.augment=small", "data.image_size=16",
        "data.shuffle_buffer=8", "data.pin_memory=false", "data.num_workers=0", "data.retries=5", "data.retry_backoff_s=0.5",
        "train.device=cpu", "train.log_every=1", "train.collapse_every=1000", "train.deterministic=true",
        f"train.global_batch_size={GLOBAL_BATCH}", "optim.warmup_epochs=1", "log.progress=false",
        "log.tensorboard=false", "eval.online_probe=false", f"checkpoint.every_steps={SAVE_EVERY}",
        "checkpoint.keep=3", "dist.timeout_minutes=0.25"]
"""A small deterministic CPU run (~0.1 s per step) whose dead-peer timeout (15 s) keeps a freeze short."""


# ---------------------------------------------------------------------------------------------------------
# the ledger: what each rank process recorded


class Ledger:
    """One JSON-lines file per (job start, rank) under ``directory``; each line flushed at once."""

    def __init__(self, directory: Path, inc: int, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._f = open(directory / f"inc-{inc:03d}-rank-{rank}.jsonl", "a")
        self.inc, self.rank = inc, rank

    def write(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"e": event, "inc": self.inc, "rank": self.rank, "t": time.time(), **fields})
                      + "\n")
        self._f.flush()


def read_ledger(directory: Path) -> list[dict[str, Any]]:
    """Every record of every process (a line torn by a SIGKILL is dropped), in file then line order."""
    out = []
    for path in sorted(directory.glob("inc-*-rank-*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def rank_main(argv: list[str]) -> int:
    """``chaos.py _rank LEDGER_DIR STOP_AT key=value ...``: ``largessl pretrain`` recording to the ledger.

    With STOP_AT > 0, the process signals itself SIGTERM as the batch of step STOP_AT is handed out, on every
    rank alike: the trainer agrees to stop after that step, saves and exits 75 (the reference run's world-size
    changes happen at exact steps this way).
    """
    ledger_dir, stop_at, overrides = Path(argv[0]), int(argv[1]), argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    ledger = Ledger(ledger_dir, int(os.environ["CHAOS_INC"]), rank)
    ledger.write("start", pid=os.getpid(), world=int(os.environ.get("WORLD_SIZE", "1")))
    import largessl.data.stream as stream_mod
    import largessl.run.checkpoint as ckpt_mod
    from largessl import cli

    build = stream_mod.build_train_stream

    class Recorded:
        def __init__(self, stream: Any) -> None:
            self._stream = stream

        def __getattr__(self, name: str) -> Any:
            return getattr(self._stream, name)

        def iterate(self, epoch: int, start_batch: int = 0, *args: Any, **kwargs: Any) -> Iterator[Any]:
            per_epoch = self._stream.batches_per_epoch
            for i, batch in enumerate(self._stream.iterate(epoch, start_batch, *args, **kwargs)):
                step = epoch * per_epoch + start_batch + i + 1
                stats = {k: int(v) for k, v in batch.stats.items() if isinstance(v, int)}
                ledger.write("batch", step=step, epoch=epoch, keys=list(batch.keys), stats=stats)
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    stream_mod.build_train_stream = lambda *a, **k: Recorded(build(*a, **k))
    save = ckpt_mod.CheckpointManager.save

    def recorded_save(self: Any, step: int, payload: Any) -> str:
        path = save(self, step, payload)
        ledger.write("saved", step=step, path=path)
        return path

    ckpt_mod.CheckpointManager.save = recorded_save  # type: ignore[method-assign]
    code = 1
    try:
        code = cli.main(["pretrain", *overrides])
        return code
    finally:
        ledger.write("exit", code=code)


# ---------------------------------------------------------------------------------------------------------
# the schedule


@dataclasses.dataclass
class Fault:
    kind: str
    gap: int
    """Steps of progress (past the job's start, or the previous fault) before this fault is injected."""
    rank: int = 0
    outage_s: float = 0.0


def draw_schedule(n: int, seed: int, kinds: Sequence[str]) -> list[Fault]:
    """``n`` faults: every kind once per round, in an order drawn per round, with gaps of 3-9 steps."""
    rng = random.Random(seed)
    out: list[Fault] = []
    while len(out) < n:
        round_ = list(kinds)
        rng.shuffle(round_)
        for kind in round_[: n - len(out)]:
            outage = rng.uniform(2, 6) if kind == "s3_read" else rng.uniform(5, 12) if kind == "s3_save" else 0.0
            out.append(Fault(kind, rng.randint(3, 9), rng.randrange(1 << 16), round(outage, 1)))
    return out


def run_length(schedule: Sequence[Fault]) -> int:
    """Steps of the run: each fault's gap (counted from where the job resumed) and a margin, then a tail."""
    return sum(f.gap + STEPS_PER_FAULT for f in schedule) + TAIL_STEPS


# ---------------------------------------------------------------------------------------------------------
# the checks (pure functions of the ledger, unit-tested in tests/unit/test_chaos_checks.py)


@dataclasses.dataclass
class Incarnation:
    """One start of the job: its processes' records."""

    inc: int
    world: int
    batches: dict[int, dict[int, dict[str, Any]]]  # step -> rank -> batch record
    saved: set[int]
    exits: dict[int, int]

    @property
    def first_step(self) -> int:
        return min(self.batches) if self.batches else 0

    @property
    def last_step(self) -> int:
        return max(self.batches) if self.batches else 0


def incarnations(records: Sequence[dict[str, Any]]) -> dict[int, Incarnation]:
    """Group ledger records by job start."""
    out: dict[int, Incarnation] = {}
    for r in records:
        inc = out.setdefault(r["inc"], Incarnation(r["inc"], 0, {}, set(), {}))
        if r["e"] == "start":
            inc.world = r["world"]
        elif r["e"] == "batch":
            inc.batches.setdefault(r["step"], {})[r["rank"]] = r
        elif r["e"] == "saved" and r["rank"] == 0:
            inc.saved.add(r["step"])
        elif r["e"] == "exit":
            inc.exits[r["rank"]] = r["code"]
    return out


def lineage(incs: dict[int, Incarnation], problems: list[str]) -> list[tuple[Incarnation, int, int]]:
    """(incarnation, first step, last step) of the chain that produced the final weights, oldest first.

    Each start resumed at the checkpoint of step ``first_step - 1``: the newest earlier start that recorded
    saving that step wrote it (or, when a kill hit between the save and its record, the newest that trained it).
    """
    if not incs:
        problems.append("the ledger is empty")
        return []
    chain: list[tuple[Incarnation, int, int]] = []
    cur = incs[max(incs)]
    end = cur.last_step
    while True:
        start = cur.first_step
        chain.append((cur, start, end))
        resumed = start - 1
        if resumed <= 0:
            break
        earlier = [i for i in incs.values() if i.inc < cur.inc]
        by_save = [i for i in earlier if resumed in i.saved]
        by_step = [i for i in earlier if resumed in i.batches]
        if not by_save and not by_step:
            problems.append(f"start {cur.inc} resumed at step {resumed}, which no earlier start trained")
            break
        cur, end = max(by_save or by_step, key=lambda i: i.inc), resumed
    chain.reverse()
    return chain


def check_run(records: Sequence[dict[str, Any]], num_steps: int, global_batch: int, steps_per_epoch: int,
              reference: dict[int, list[str]] | None = None) -> tuple[list[str], dict[int, list[str]]]:
    """Problems found in the ledger (empty when nothing was lost), and the keys trained per step of the lineage.

    ``reference`` maps step -> sorted keys of an undisturbed run; when given, every step must match it.
    """
    problems: list[str] = []
    incs = incarnations(records)
    chain = lineage(incs, problems)
    per_step: dict[int, list[str]] = {}
    for inc, first, last in chain:
        for step in range(first, last + 1):
            ranks = inc.batches.get(step)
            if not ranks:
                problems.append(f"step {step}: start {inc.inc} of the lineage has no batch for it")
                continue
            if sorted(ranks) != list(range(inc.world)):
                problems.append(f"step {step}: batches from ranks {sorted(ranks)} of {inc.world}")
            keys = [k for r in sorted(ranks) for k in ranks[r]["keys"]]
            if len(keys) != global_batch:
                problems.append(f"step {step}: {len(keys)} samples, the global batch is {global_batch}")
            for r in ranks.values():
                skipped = {k: v for k, v in r["stats"].items() if k.startswith("skipped") and v}
                if skipped:
                    problems.append(f"step {step} rank {r['rank']}: {skipped}")
            per_step[step] = sorted(keys)
    if sorted(per_step) != list(range(1, num_steps + 1)):
        missing = sorted(set(range(1, num_steps + 1)) - set(per_step))
        problems.append(f"the lineage trains steps {min(per_step, default=0)}-{max(per_step, default=0)}"
                        f"{f', missing {missing[:10]}' if missing else ''}; the run has {num_steps}")
    seen: dict[int, dict[str, int]] = {}
    for step in sorted(per_step):
        epoch = (step - 1) // steps_per_epoch
        for k in per_step[step]:
            if k in seen.setdefault(epoch, {}):
                problems.append(f"sample {k} trained twice in epoch {epoch} (steps {seen[epoch][k]} and {step})")
            seen[epoch][k] = step
    if reference is not None:
        for step in sorted(per_step):
            if step in reference and reference[step] != per_step[step]:
                problems.append(f"step {step}: its batch differs from the undisturbed run's")
    return problems, per_step


def world_legs(records: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(world size, first step) of each stretch of the lineage, consecutive equal world sizes merged."""
    legs: list[tuple[int, int]] = []
    for inc, first, _ in lineage(incarnations(records), []):
        if not legs or legs[-1][0] != inc.world:
            legs.append((inc.world, first))
    return legs


# ---------------------------------------------------------------------------------------------------------
# running jobs


@dataclasses.dataclass
class Job:
    inc: int
    world: int
    procs: list[subprocess.Popen[bytes]]

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.poll() is None]

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> list[int]:
        """Exit codes of every rank (a straggler past ``timeout`` is killed: a frozen rank, as a scheduler would)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]


class Runner:
    """Starts jobs (all ranks of one start) and reads their progress from the ledger."""

    def __init__(self, out: Path, ledger: Path, overrides: list[str], env: dict[str, str]) -> None:
        self.out, self.ledger, self.overrides, self.env = out, ledger, overrides, env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.inc = 0

    def start(self, world: int, stop_at: int = 0) -> Job:
        from largessl.distributed.env import free_port

        port = free_port()
        inc = self.inc
        self.inc += 1
        procs = []
        for rank in range(world):
            env = dict(self.env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CHAOS_INC=str(inc))
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            with open(self.logs / f"start-{inc:03d}-rank-{rank}.log", "w") as f:
                procs.append(subprocess.Popen([sys.executable, __file__, "_rank", str(self.ledger), str(stop_at),
                                               *self.overrides], env=env, stdout=f, stderr=subprocess.STDOUT,
                                              cwd=ROOT))
        return Job(inc, world, procs)

    def steps(self, job: Job) -> list[int]:
        """Steps whose batch rank 0 of ``job`` was handed, in order."""
        path = self.ledger / f"inc-{job.inc:03d}-rank-0.jsonl"
        out = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if r["e"] == "batch":
                    out.append(r["step"])
        return out

    def progress(self, job: Job) -> int:
        """Newest step rank 0 of ``job`` was handed (0 before its first)."""
        return (self.steps(job) or [0])[-1]

    def wait_for_step(self, job: Job, step: int, timeout: float = JOB_TIMEOUT_S) -> bool:
        """True once ``job`` reaches ``step``; False when one of its ranks exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.progress(job) >= step:
                return True
            if any(p.poll() is not None for p in job.procs):
                return self.progress(job) >= step
            time.sleep(0.05)
        raise TimeoutError(f"start {job.inc} did not reach step {step} in {timeout:.0f} s")

    def log_text(self, job: Job) -> str:
        """The logs of every rank of ``job``."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob(f"start-{job.inc:03d}-rank-*.log")))


def exit_reason(text: str, codes: Sequence[int]) -> str:
    """A short cause for a job's exit: the first error any of its ranks logged (``HH:MM:SS [rank R] ERROR ...``)."""
    if all(c == 0 for c in codes):
        return "completed"
    errors = sorted(line for line in text.splitlines() if re.match(r"\d\d:\d\d:\d\d \[rank \d+\] ERROR ", line))
    first = errors[0].lower() if errors else ""
    if "disk full" in first or "no space left" in first:
        return "disk full"
    if "storage error" in first:
        saving = re.search(r"/step-0*(\d+)/", first)
        return f"storage error saving step {saving.group(1)}" if saving else "storage error reading data"
    if "timed out" in first or "timeout" in first:
        return "collective timeout"
    if "connection closed" in first or "connection reset" in first:
        return "peer gone"
    if all(c == 75 for c in codes):
        return "stop agreed, saved"
    return first[first.find("error") + 6:][:60] if first else "killed"


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A ``size_mb`` tmpfs at ``path`` (root only), unmounted at exit."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"chaos: cannot mount a tmpfs at {path} (root needed for the full-disk fault): "
                         f"{out.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> Path:
    """Fill the volume of ``path`` with one file until ENOSPC; returns the file (delete it to free the space)."""
    filler = path / ".chaos-filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 10, 1):  # down to the last byte: a metrics line must not fit
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return filler


# ---------------------------------------------------------------------------------------------------------
# the chaos run


@dataclasses.dataclass
class Row:
    n: int
    kind: str
    target: str
    at_step: int
    codes: list[int] = dataclasses.field(default_factory=list)
    ended_at: int = 0
    restarted: bool = False
    world_after: int = 0
    resumed_at: int | None = None
    redone: int = 0
    lost_s: float = 0.0
    note: str = ""
    t_fault: float = 0.0


def corrupt_newest(fs: Any, ckpt_root: str) -> str:
    """Overwrite the newest complete checkpoint's weights with garbage of the same size; returns its folder."""
    fs.invalidate_cache()
    steps = sorted(p for p in fs.ls(ckpt_root, detail=False) if p.rsplit("/", 1)[-1].startswith("step-")
                   and fs.exists(f"{p}/COMPLETE.json"))
    newest = steps[-1]
    target = f"{newest}/model.safetensors"
    size = fs.info(target)["size"]
    fs.pipe(target, bytes(random.Random(size).getrandbits(8) for _ in range(size)))
    return newest


def chaos(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import s3_server

    from largessl.data.digits import write_digits_shards
    from largessl.data.manifest import read_manifest
    from largessl.run.checkpoint import find_latest_checkpoint, load_model_state, load_training_checkpoint

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    kinds = KINDS if args.kinds == "all" else tuple(args.kinds.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"chaos: unknown fault kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.world not in worlds:
        worlds.insert(0, args.world)
    if "world" in kinds and len(worlds) < 2:
        raise SystemExit("chaos: the world fault needs two world sizes in --worlds")
    schedule = draw_schedule(args.faults, args.seed, kinds)
    num_steps = args.steps or run_length(schedule)
    rng = random.Random(f"chaos-{args.seed}")
    t0 = time.time()
    with s3_server(bucket="chaos") as s3, tmpfs(out / "run", RUN_DIR_MB) as run_dir:
        os.environ.update(s3.env())  # this process writes the shards and reads the checkpoints too
        env = dict(os.environ)
        print(f"chaos: S3 at {s3.endpoint_url}; writing digits shards", flush=True)
        train, _ = write_digits_shards(s3.url("digits16"), image_size=16, val_fraction=0.5)
        n_train = read_manifest(train, s3.storage_options()).num_samples
        steps_per_epoch = n_train // GLOBAL_BATCH
        common = [*BASE, f"data.train_manifest={train}", f"data.endpoint_url={s3.endpoint_url}",
                  f"train.num_steps={num_steps}", *args.set]
        ckpt = s3.url("chaos-run", "checkpoints")
        runner = Runner(out, out / "ledger", [*common, f"train.run_dir={run_dir}", f"checkpoint.dir={ckpt}"], env)
        print(f"chaos: {len(schedule)} faults over {num_steps} steps ({n_train} samples, {steps_per_epoch} steps "
              f"per epoch, global batch {GLOBAL_BATCH}), worlds {worlds}", flush=True)
        rows = _inject(runner, schedule, args.world, worlds, rng, s3, ckpt, run_dir, num_steps)
        records = read_ledger(out / "ledger")
        legs = world_legs(records)
        print(f"chaos: injected {len(rows)} faults in {time.time() - t0:.0f} s; world legs {legs}; "
              "running the undisturbed reference", flush=True)
        ref_ckpt = s3.url("chaos-reference", "checkpoints")
        ref = Runner(out, out / "ledger-reference", [*common, f"train.run_dir={out / 'reference'}",
                                                     f"checkpoint.dir={ref_ckpt}"], env)
        ref.inc = 1000
        for i, (world, _first) in enumerate(legs):
            stop_at = legs[i + 1][1] - 1 if i + 1 < len(legs) else 0
            codes = ref.start(world, stop_at).wait()
            want = 75 if stop_at else 0
            if codes != [want] * world:
                raise SystemExit(f"chaos: the reference run's leg {i} (world {world}) exited {codes}, expected "
                                 f"{want}; logs under {out / 'logs'}")
        ref_steps = {s: sorted(k) for s, k in check_run(read_ledger(out / "ledger-reference"), num_steps,
                                                        GLOBAL_BATCH, steps_per_epoch)[1].items()}
        problems, _ = check_run(records, num_steps, GLOBAL_BATCH, steps_per_epoch, ref_steps)
        problems += _compare_final(find_latest_checkpoint(ckpt, s3.endpoint_url),
                                   find_latest_checkpoint(ref_ckpt, s3.endpoint_url), s3.endpoint_url, num_steps,
                                   load_model_state, load_training_checkpoint)
    _annotate(rows, records)
    report = _report(args, rows, legs, problems, num_steps, time.time() - t0)
    (out / "chaos.md").write_text(report)
    (out / "chaos.json").write_text(json.dumps({"seed": args.seed, "num_steps": num_steps, "legs": legs,
                                                "problems": problems,
                                                "faults": [dataclasses.asdict(r) for r in rows]}, indent=1))
    print(report, flush=True)
    return 1 if problems else 0


def _compare_final(path: str | None, ref_path: str | None, endpoint: str, num_steps: int, load_model: Any,
                   load_training: Any) -> list[str]:
    import torch

    if path is None or ref_path is None:
        return [f"no final checkpoint (chaos run: {path}, reference: {ref_path})"]
    w, _, meta = load_model(path, endpoint_url=endpoint)
    w_ref, _, meta_ref = load_model(ref_path, endpoint_url=endpoint)
    problems = []
    if meta["step"] != num_steps or meta_ref["step"] != num_steps:
        problems.append(f"final checkpoints at steps {meta['step']} and {meta_ref['step']}, not {num_steps}")
    differ = [k for k in w_ref if k not in w or not torch.equal(w[k], w_ref[k])]
    if differ or w.keys() != w_ref.keys():
        problems.append(f"final weights differ from the undisturbed run's: {differ[:5]}")
    opt, opt_ref = load_training(path, endpoint)["optimizer"], load_training(ref_path, endpoint)["optimizer"]
    if opt["state"].keys() != opt_ref["state"].keys():
        problems.append("the optimizer states hold different parameters")
    differ = [f"{k}.{name}" for k, state in opt["state"].items() for name, t in state.items()
              if torch.is_tensor(t) and not torch.equal(t, opt_ref["state"].get(k, {}).get(name, torch.empty(0)))]
    if differ:
        problems.append(f"optimizer state differs from the undisturbed run's: {differ[:5]}")
    return problems


def _inject(runner: Runner, schedule: list[Fault], world: int, worlds: list[int], rng: random.Random, s3: Any,
            ckpt: str, run_dir: Path, num_steps: int) -> list[Row]:
    """Run the job through ``schedule``; returns one row per fault (outcomes filled in by :func:`_annotate`)."""
    fs = s3.filesystem()
    rows: list[Row] = []
    job = runner.start(world)
    pending = list(schedule)
    base = _resumed_at(runner, job)  # progress the next fault's gap counts from
    while True:
        if not pending:
            codes = job.wait()
            if codes == [0] * job.world:
                return rows
            raise SystemExit(f"chaos: start {job.inc} exited {codes} without a fault; see {runner.logs}")
        fault = pending.pop(0)
        n = len(rows) + 1
        target = base + fault.gap
        if fault.kind == "s3_save":  # the outage starts just before a checkpoint step
            target = ((target + SAVE_EVERY - 1) // SAVE_EVERY) * SAVE_EVERY - 1
        elif fault.kind == "s3_read":  # just after one: the ranks are likelier to open a shard before the next
            target = ((target + SAVE_EVERY - 2) // SAVE_EVERY) * SAVE_EVERY + 1
        target = min(target, num_steps - 3)
        if not runner.wait_for_step(job, target):
            raise SystemExit(f"chaos: start {job.inc} exited {[p.poll() for p in job.procs]} before fault {n} "
                             f"({fault.kind}); see {runner.logs}")
        at = runner.progress(job)
        row = Row(n, fault.kind, "", at, t_fault=time.time())
        print(f"chaos: fault {n}/{len(schedule)} {fault.kind} at step {at} (start {job.inc}, {job.world} ranks)",
              flush=True)
        restart_world = job.world
        victim = fault.rank % job.world
        if fault.kind == "sigkill":
            row.target = f"rank {victim}"
            job.procs[victim].send_signal(signal.SIGKILL)
        elif fault.kind == "sigstop":
            row.target = f"rank {victim}"
            job.procs[victim].send_signal(signal.SIGSTOP)
            others = [p for r, p in enumerate(job.procs) if r != victim]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while any(p.poll() is None for p in others) and time.monotonic() < deadline:
                time.sleep(0.1)
            row.note = f"peers exited {time.time() - row.t_fault:.1f} s after the freeze"
            job.procs[victim].send_signal(signal.SIGKILL)  # the scheduler clears the frozen node
        elif fault.kind in ("sigterm", "corrupt", "world"):
            row.target = "all ranks"
            for p in job.procs:
                p.send_signal(signal.SIGTERM)
        elif fault.kind in ("s3_read", "s3_save"):
            row.target = f"S3 down {fault.outage_s:.1f} s"
            s3.kill()
            time.sleep(fault.outage_s)
            s3.restart()
        elif fault.kind == "disk_full":
            row.target = "run directory"
            filler = fill(run_dir)
            runner.wait_for_step(job, at + 40)
            filler.unlink()
        if fault.kind in ("s3_read", "s3_save", "disk_full"):
            # survived only if it trains on: a few more steps, or a rank exits (its peers follow within the
            # collective timeout)
            runner.wait_for_step(job, runner.progress(job) + 3)
        if fault.kind not in ("sigkill", "sigterm", "sigstop", "corrupt", "world") \
                and all(p.poll() is None for p in job.procs):  # survived: the same job meets the next fault
            row.note = row.note or "survived"
            rows.append(row)
            base = runner.progress(job)
            continue
        row.codes = job.wait()
        row.ended_at = runner.progress(job)
        row.restarted = True
        reason = exit_reason(runner.log_text(job), row.codes)
        row.note = f"{row.note}; {reason}" if row.note else reason
        if fault.kind == "corrupt":
            row.note += f"; corrupted {corrupt_newest(fs, ckpt).rsplit('/', 1)[-1]}"
        if fault.kind == "world":
            restart_world = rng.choice([w for w in worlds if w != job.world])
        row.world_after = restart_world
        rows.append(row)
        job = runner.start(restart_world)
        base = _resumed_at(runner, job)


def _resumed_at(runner: Runner, job: Job) -> int:
    """The step ``job`` resumed at, once its first batch is out (the job's exit code if it never gets there)."""
    if not runner.wait_for_step(job, 1):
        raise SystemExit(f"chaos: start {job.inc} exited {job.wait()} before its first step; see {runner.logs}")
    return runner.steps(job)[0] - 1


def _annotate(rows: list[Row], records: list[dict[str, Any]]) -> None:
    """Fill in where each restarted job resumed, the steps it redid and the time lost, from the ledger."""
    incs = incarnations(records)
    starts = sorted(incs)
    step_times = [r["t"] for r in records if r["e"] == "batch" and r["rank"] == 0]
    gaps = [b - a for a, b in zip(step_times, step_times[1:]) if b > a]
    median = statistics.median(gaps) if gaps else 0.0
    times: dict[int, dict[int, float]] = {}
    for r in records:
        if r["e"] == "batch" and r["rank"] == 0:
            times.setdefault(r["inc"], {}).setdefault(r["step"], r["t"])
    inc_iter = iter(starts)
    cur = next(inc_iter)
    for row in rows:
        if not row.restarted:
            # the steps that took longer than usual while the fault lasted
            ts = sorted(t for t in times.get(cur, {}).values() if t >= row.t_fault - median)
            window = [b - a for a, b in zip(ts, ts[1:])][:60]
            row.lost_s = round(sum(max(0.0, g - median) for g in window if g > 3 * median), 1)
            continue
        failed = times.get(cur, {})
        last_t = max(failed.values(), default=row.t_fault)
        nxt = next(inc_iter, None)
        if nxt is None:
            break
        cur = nxt
        new = times.get(cur, {})
        row.resumed_at = incs[cur].first_step - 1 if new else None
        row.redone = max(0, row.ended_at - (row.resumed_at or 0))
        again = [t for s, t in new.items() if s >= row.ended_at]
        row.lost_s = round(max(0.0, (min(again) if again else max(new.values(), default=last_t)) - last_t - median),
                           1)


def _report(args: argparse.Namespace, rows: list[Row], legs: list[tuple[int, int]], problems: list[str],
            num_steps: int, wall_s: float) -> str:
    restarts = sum(r.restarted for r in rows)
    lines = [f"Command: `python tools/chaos.py --out OUT --faults {args.faults} --seed {args.seed} --world "
             f"{args.world} --worlds {args.worlds}`",
             "",
             f"{len(rows)} faults over a {num_steps}-step run, {restarts} restarts, {len(rows) - restarts} survived "
             f"without one, {sum(r.redone for r in rows)} steps redone, {sum(r.lost_s for r in rows):.1f} s lost; "
             f"world sizes {' -> '.join(str(w) for w, _ in legs)}; wall time {wall_s:.0f} s.",
             "",
             "| # | fault | target | at step | exit codes | ended at | ranks after | resumed at | steps redone "
             "| time lost (s) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        codes = " ".join(str(c) for c in r.codes) if r.codes else "running"
        lines.append(f"| {r.n} | {r.kind} | {r.target} | {r.at_step} | {codes} | {r.ended_at or '-'} | "
                     f"{r.world_after or '-'} | {r.resumed_at if r.resumed_at is not None else '-'} | {r.redone} | "
                     f"{r.lost_s:.1f} | {r.note} |")
    lines += ["", "Lost: " + ("**nothing** (every step once along the lineage, each with the full global batch; no "
                              "sample twice in an epoch, none skipped; batches and final weights and optimizer "
                              "state bitwise equal to the undisturbed run with the same world sizes)"
                              if not problems else "; ".join(problems)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_rank":
        return rank_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for chaos.md, chaos.json, the ledger and the logs")
    p.add_argument("--faults", type=int, default=30, help="number of faults to inject (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seeds the schedule, targets and outages (default 0)")
    p.add_argument("--world", type=int, default=2, help="world size of the first start (default 2)")
    p.add_argument("--worlds", default="2,3,4", help="world sizes the world fault draws from (default 2,3,4)")
    p.add_argument("--kinds", default="all", help=f"comma-separated fault kinds (default all: {','.join(KINDS)})")
    p.add_argument("--steps", type=int, default=0, help="run length in steps (default: from the schedule)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    return chaos(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
