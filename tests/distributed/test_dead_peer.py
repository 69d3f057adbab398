"""Fast failure: when one of 2 gloo ranks dies (SIGKILL) or freezes (SIGSTOP, as with a lost node whose
connections stay open), the survivor exits 3 within the documented bound instead of hanging, and the same
command then resumes from the last checkpoint. Real ``largessl pretrain`` processes with a loader worker each.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import cli_runs
import pytest

from largessl.distributed.env import stall_timeout_s
from largessl.run import exit_codes
from largessl.run.checkpoint import find_latest_checkpoint

pytestmark = [pytest.mark.timeout(600)]

TIMEOUT_MINUTES = 0.25
"""dist.timeout_minutes for the test (default 4): the bound is stall_timeout_s(0.25) = 30 s."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    from largessl.data.digits import write_digits_shards

    train, _ = write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)
    return train


@pytest.mark.parametrize("how", ["sigkill-rank1", pytest.param("sigstop-rank0", marks=pytest.mark.slow)])  # 23 s: CI only
def test_survivor_exits_3_within_the_bound_then_a_rerun_resumes(tmp_path: Path, digits: str, how: str) -> None:
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=1",
            "checkpoint.every_steps=2", f"dist.timeout_minutes={TIMEOUT_MINUTES}"]
    procs = cli_runs.start([*args, "train.num_steps=400"], logs, world=2)
    cli_runs.wait_for_step(run, 3, procs)
    victim_rank = 1 if how.startswith("sigkill") else 0  # rank 0 also hosts the rendezvous store
    victim, survivor = procs[victim_rank], procs[1 - victim_rank]
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL if how.startswith("sigkill") else signal.SIGSTOP)
    try:
        code = survivor.wait(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        victim.kill()
        victim.wait()
    bound = stall_timeout_s(TIMEOUT_MINUTES)
    assert code == exit_codes.ENVIRONMENT, cli_runs.logs(logs)
    assert elapsed <= bound, f"the survivor needed {elapsed:.1f} s, the documented bound is {bound:.0f} s"
    survivor_log = sorted(logs.glob(f"*-rank{1 - victim_rank}.log"))[-1]
    assert "ERROR largessl:" in cli_runs.last_line(survivor_log)  # one line saying why (gloo's error)

    ckpt = find_latest_checkpoint(run / "checkpoints")
    assert ckpt is not None
    saved = int(ckpt.rsplit("-", 1)[1])
    procs = cli_runs.start([*args, "--allow-change=train.num_steps", f"train.num_steps={saved + 2}"], logs, world=2)
    assert cli_runs.wait(procs) == [exit_codes.OK] * 2, cli_runs.logs(logs)
    assert f"resumed from {ckpt} at step {saved}" in cli_runs.logs(logs)
    assert max(cli_runs.steps(run)) == saved + 2
