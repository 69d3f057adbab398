"""The collapse guard on real ``largessl pretrain`` processes: VICReg with only its invariance term (a known
collapse: nothing keeps the embeddings apart) is stopped with exit 5, a checkpoint, the reason in state.json and
``largessl status``, and ``hub push`` refuses it unless ``--force``; the healthy recipe runs its full length."""

from __future__ import annotations

import json
from pathlib import Path

import cli_runs
import pytest

from largessl.cli import main
from largessl.run import exit_codes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 300


def _run(tmp_path: Path, digits: str, name: str, *method: str) -> tuple[int, Path]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    run = tmp_path / name
    args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}", "data.num_workers=0",
            f"train.num_steps={STEPS}", "train.collapse_every=10", "checkpoint.every_steps=1000", "optim.base_lr=5",
            *method]
    (proc,) = cli_runs.start(args, logs)
    (code,) = cli_runs.wait([proc])
    return code, run


def test_a_collapsing_run_stops_and_a_healthy_one_does_not(tmp_path: Path, digits: str, capsys) -> None:
    code, run = _run(tmp_path, digits, "invariance-only", "method.name=vicreg", "method.std_coeff=0",
                     "method.cov_coeff=0", "method.projector=32-32")
    assert code == exit_codes.COLLAPSED, cli_runs.logs(tmp_path / "logs")
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "collapsed" and state["exit_code"] == 5 and "collapsed:" in state["reason"]
    stopped = state["step"]
    assert stopped < STEPS and (run / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE.json").is_file()
    assert main(["status", str(run)]) == 0
    table = capsys.readouterr().out
    assert "collapsed (5)" in table and "stopped by train.collapse_guard" in table
    hub = str(tmp_path / "hub")
    assert main(["hub", "push", str(run), "--hub", hub, "--version", "v1"]) == 2  # refused
    assert not (tmp_path / "hub").exists()
    assert main(["hub", "push", str(run), "--hub", hub, "--version", "v1", "--force"]) == 0

    code, healthy = _run(tmp_path, digits, "vicreg", "method.name=vicreg", "method.projector=32-32")
    assert code == exit_codes.OK, cli_runs.logs(tmp_path / "logs")
    assert json.loads((healthy / "state.json").read_text())["step"] == STEPS
    print(f"collapse guard: invariance-only VICReg stopped at step {stopped} of {STEPS} "
          f"({100 * (STEPS - stopped) / STEPS:.0f}% of the run's steps saved); healthy VICReg ran all {STEPS}")
