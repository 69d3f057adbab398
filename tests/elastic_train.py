"""``python tests/elastic_train.py STOP_AT key=value ...``: the pretrain CLI's flow on real shards, recording what it trains on.

For elastic-resume tests (never shipped). Each rank appends to ``<run_dir>/record/rank<R>-<pid>.jsonl``:
one line per batch the trainer takes (``epoch``, ``batch``, ``keys``), and after the automatic resume one
line with the step it resumed at and a digest of the optimizer state it loaded; with DeepSpeed ZeRO-1/2 it
also saves its pieces of the whole training state before every save and after the resume (``zero-*.pt``,
:mod:`zero_state`). With ``STOP_AT`` > 0 every rank raises its own stop signal while the batch of step ``STOP_AT`` trains, so the run saves at
exactly that step and exits 75 through the trainer's real stop path (0 = run to the end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch


def optimizer_digest(state: dict) -> str:
    """sha256 over every tensor of an optimizer state_dict (param order), plus its scalars."""
    h = hashlib.sha256()
    for pid in sorted(state["state"]):
        for k in sorted(state["state"][pid]):
            v = state["state"][pid][k]
            h.update(f"{pid}/{k}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    """Run the trainer like ``largessl pretrain`` with recording hooks."""

    from largessl.config import load_config
    from largessl.distributed.env import detect_env, init_distributed, setup_logging, shutdown_distributed
    from largessl.train.trainer import build_trainer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    stop_at, overrides = int(argv[0]), argv[1:]
    cfg = load_config(None, overrides)
    env = detect_env()
    setup_logging(env, "INFO")
    init_distributed(env, "gloo", cfg.dist.timeout_minutes)
    try:
        trainer = build_trainer(cfg, env)
        out = Path(cfg.train.run_dir) / "record"
        out.mkdir(parents=True, exist_ok=True)
        record = open(out / f"rank{env.rank}-{os.getpid()}.jsonl", "a")

        def write(**row) -> None:
            record.write(json.dumps(row) + "\n")
            record.flush()

        stream_iterate, resume, save = trainer.stream.iterate, trainer.resume, trainer.save

        def dump_zero(when: str) -> None:
            """With DeepSpeed ZeRO-1/2: this rank's pieces of the whole training state (tests/zero_state.py)."""
            if trainer.engine is not None and trainer.cfg.dist.zero_stage in (1, 2):
                from zero_state import rank_pieces

                torch.save(rank_pieces(trainer.engine),
                           out / f"zero-{when}-step{trainer.step}-w{trainer.world_size}-rank{env.rank}.pt")

        def iterate(epoch: int, start_batch: int = 0):
            for k, batch in enumerate(stream_iterate(epoch, start_batch)):
                step = epoch * trainer.plan.steps_per_epoch + start_batch + k + 1  # the step this batch makes
                write(epoch=epoch, batch=start_batch + k, step=step, keys=batch.keys)
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag; seen after this step
                yield batch

        def saved(metrics: dict) -> str:
            dump_zero("saved")
            return save(metrics)

        def resumed() -> bool:
            ok = resume()
            if ok:
                dump_zero("resumed")
            write(resumed=ok, step=trainer.step, world_size=trainer.world_size,
                  optimizer=optimizer_digest(trainer.optimizer.state_dict()), skip_base=trainer.skip_base)
            return ok

        trainer.stream.iterate = iterate  # type: ignore[method-assign]
        trainer.resume = resumed  # type: ignore[method-assign]
        trainer.save = saved  # type: ignore[method-assign]
        result = trainer.fit()
        logging.getLogger("elastic").info("exit %d at step %d", result.exit_code, result.step)
        return result.exit_code
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    # Like the CLI (largessl.cli): flush, then os._exit, with no interpreter teardown. A gloo rank torn down by
    # the interpreter after its peer exited once aborted with "terminate called without an active exception"
    # (exit -6 instead of 75) in the DDP legs of the DeepSpeed resume test.
    code = main(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
