"""launchers/k8s_imagenet.sh follows the Job with a bound: Complete → stages applied, exit 0; Failed → exit 1
with the Job's reason, stages not applied; no end within WAIT_TIMEOUT_S → exit 124; API unreachable → 3.

``kubectl`` is a stand-in script on PATH that plays the API server's side (the Job's conditions over time,
read from a file) and records every call; the launcher script itself is what runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAKE_KUBECTL = r"""#!/usr/bin/env bash
# Records its arguments; `get job/...` answers with the next line of $FAKE_DIR/states ("-" = no terminal
# condition yet, "ERR" = the API server is unreachable), repeating the last line when they run out.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *" get job/"*)
    n=$(cat "$FAKE_DIR/n" 2>/dev/null || echo 0)
    line=$(sed -n "$((n + 1))p" "$FAKE_DIR/states"); [[ -n "$line" ]] || line=$(tail -n 1 "$FAKE_DIR/states")
    [[ "$*" == *'type=="Failed"'* ]] && { echo -n "BackoffLimitExceeded: Job has reached the specified backoff limit"; exit 0; }
    echo $((n + 1)) > "$FAKE_DIR/n"
    [[ "$line" == ERR ]] && { echo "Unable to connect to the server" >&2; exit 1; }
    [[ "$line" == - ]] || printf 'SuccessCriteriaMet\n%s\n' "$line"
    ;;
esac
"""


def _run(repo_root: Path, tmp_path: Path, states: list[str], **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "kubectl").write_text(FAKE_KUBECTL)
    (fake / "kubectl").chmod(0o755)
    (fake / "states").write_text("\n".join(states) + "\n")
    path = f"{fake}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    res = subprocess.run(["bash", str(repo_root / "launchers" / "k8s_imagenet.sh")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path,
                         env={**os.environ, "PATH": path, "FAKE_DIR": str(fake), "IMAGE": "reg.example/largessl:1",
                              "OUT": str(tmp_path / "out"), "POLL_S": "0.05", "OFFLINE": "1", **env})
    calls = (fake / "calls").read_text() if (fake / "calls").exists() else ""
    return res, calls


@pytest.mark.parametrize("states,code,stages", [
    (["ERR", "-", "Complete"], 0, True),  # a blip of the API server is retried
    (["-", "Failed"], 1, False),
    (["-"], 124, False),
    (["-", "ERR", "ERR", "ERR", "ERR", "ERR"], 3, False),
], ids=["complete", "failed", "timeout", "api-unreachable"])
def test_launcher_waits_with_a_bound(repo_root: Path, tmp_path: Path, states: list[str], code: int,
                                     stages: bool) -> None:
    res, calls = _run(repo_root, tmp_path, states, WAIT_TIMEOUT_S="2")
    assert res.returncode == code, (res.stdout, res.stderr)
    assert f"apply -f {tmp_path}/out/pretrain.yaml" in calls
    assert (f"apply -f {tmp_path}/out/stages.yaml" in calls) == stages
    if code == 1:
        assert "failed (BackoffLimitExceeded: Job has reached the specified backoff limit)" in res.stderr
    if code == 124:
        assert "did not finish within 2s; it keeps running" in res.stderr
