"""tools/gpu_acceptance.sh: the one-call GPU acceptance run, exercised on the CPU with ``--dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_acceptance.sh"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable, OMP_NUM_THREADS="1")


def test_usage_errors_name_what_is_missing(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=_env(), timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr and "OUT_DIR" in out.stderr
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0  # the real flow parses too


@pytest.mark.slow  # ~80 s on 2 cores: seven CLI runs, each importing torch
def test_the_dry_run_writes_every_report(tmp_path):
    out_dir = tmp_path / "acceptance"
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out_dir)], capture_output=True, text=True,
                         env=_env(), timeout=600, cwd=tmp_path)
    summary = (out_dir / "summary.txt").read_text()
    assert out.returncode == 0, summary + out.stdout[-2000:] + out.stderr[-2000:]
    assert "FAILED" not in summary and "gpu-test: skipped in --dry-run" in summary
    for name in ("step-bt-r50", "step-dbn-eigh", "step-dbn-newton_schulz", "data", "e2e-gpu", "e2e-cpu", "syncs",
                 "syncs-decode-gpu"):
        json.loads((out_dir / f"{name}.json").read_text())
    assert (out_dir / "shards" / "manifest.json").is_file()
    e2e = json.loads((out_dir / "e2e-gpu.json").read_text())
    assert "gpu" in json.dumps(e2e)  # the data.decode=gpu run
    syncs = {r["method"]: r for r in json.loads((out_dir / "syncs.json").read_text())["rows"]}
    assert syncs["barlow_twins"]["max_per_step"] == 0 and syncs["barlow_twins"]["online_probe"]
    assert syncs["decorrelation"]["per_step"] == [{"linalg_eigh": 2}]
    (row,) = json.loads((out_dir / "syncs-decode-gpu.json").read_text())["rows"]
    assert row["decode"] == "gpu" and row["max_per_step"] == 0
