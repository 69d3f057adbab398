"""CI's skip gate: tests/conftest.py reports every skip, tools/check_skips.py fails on any outside tests/gpu/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_pytest(where: Path, report: Path) -> subprocess.CompletedProcess[str]:
    # Our conftest loaded as a plugin into a pytest run over a scratch tree (rootdir = where).
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}", LARGESSL_SKIP_REPORT=str(report))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(where), str(where / "tests")], cwd=where, env=env,
                          capture_output=True, text=True, timeout=120)


def _check(report: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_skips.py"), str(report)],
                          capture_output=True, text=True, timeout=60)


def test_skips_outside_gpu_fail_ci_and_gpu_skips_do_not(tmp_path):
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    (tmp_path / "tests" / "gpu" / "test_cuda.py").write_text(
        "import pytest\n\ndef test_needs_cuda():\n    pytest.skip('CUDA is not available')\n")
    (tmp_path / "tests" / "test_ok.py").write_text("def test_runs():\n    pass\n")
    report = tmp_path / "skips.jsonl"
    run = _run_pytest(tmp_path, report)
    assert run.returncode == 0, run.stdout + run.stderr
    ok = _check(report)
    assert ok.returncode == 0 and "no test skipped outside tests/gpu/" in ok.stdout, ok.stdout + ok.stderr

    # A skip inside a test and a module skipped at import (importorskip) both fail CI, each named with its reason.
    (tmp_path / "tests" / "test_slurm.py").write_text(
        "import pytest\n\ndef test_cluster():\n    pytest.skip('no SLURM test cluster on this machine')\n")
    (tmp_path / "tests" / "test_extra.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_largessl', reason='optional extra missing')\n")
    run = _run_pytest(tmp_path, report)
    assert run.returncode == 0 and "CI fails on these" in run.stdout, run.stdout  # a developer's run still passes
    bad = _check(report)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "tests/test_slurm.py::test_cluster: no SLURM test cluster on this machine" in bad.stderr, bad.stderr
    assert "tests/test_extra.py: optional extra missing" in bad.stderr, bad.stderr
    assert "test_needs_cuda" not in bad.stderr


def test_missing_or_unfinished_report_fails(tmp_path):
    assert _check(tmp_path / "none.jsonl").returncode == 1
    (tmp_path / "torn.jsonl").write_text("")
    assert _check(tmp_path / "torn.jsonl").returncode == 1
