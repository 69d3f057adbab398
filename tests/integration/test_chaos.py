"""A short chaos run (tools/chaos.py): 8 faults of every kind against one 2-4-rank run on a real S3 server, then
the tool's own checks (every step once, no sample twice per epoch, none skipped, bitwise equal to an undisturbed
run with the same world sizes). docs/reliability.md records a long one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import servers

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_seeded_chaos_run_loses_nothing(tmp_path: Path) -> None:
    try:
        servers.weed_binary()
    except servers.ServerUnavailable as e:
        pytest.skip(f"the chaos run keeps its data and checkpoints on SeaweedFS: {e}")
    if os.geteuid() != 0:
        pytest.skip("the chaos run's full-disk fault mounts a small tmpfs, which needs root (CI runs as root)")
    out = tmp_path / "chaos"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "chaos.py"), "--out", str(out), "--faults", "8",
                           "--seed", "0"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=1400)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    assert report["problems"] == []
    rows = report["faults"]
    assert sorted(r["kind"] for r in rows) == sorted(["sigkill", "sigterm", "sigstop", "s3_read", "s3_save",
                                                      "disk_full", "corrupt", "world"])
    by_kind = {r["kind"]: r for r in rows}
    # the faults that end a job did: the tool restarted it, and it resumed where a checkpoint was
    for kind in ("sigkill", "sigterm", "sigstop", "corrupt", "world"):
        assert by_kind[kind]["restarted"] and by_kind[kind]["resumed_at"] is not None, by_kind[kind]
    assert by_kind["sigterm"]["codes"] == [75] * len(by_kind["sigterm"]["codes"])
    assert 3 in by_kind["sigkill"]["codes"] and -9 in by_kind["sigkill"]["codes"]  # the peer exits 3
    # the corrupted newest checkpoint is refused: the job resumes from the one before it
    assert by_kind["corrupt"]["resumed_at"] < by_kind["corrupt"]["ended_at"]
    assert by_kind["world"]["world_after"] != report["legs"][0][0] and len(report["legs"]) >= 2
    assert "Lost: **nothing**" in (out / "chaos.md").read_text()
