"""Shared test fixtures and helpers, and the skip report that CI reads.

Skips: a test that cannot run here (no root for apt, no CUDA, an optional extra missing) skips with its
reason, and the summary names every skip outside ``tests/gpu/``. With ``LARGESSL_SKIP_REPORT=FILE`` set
(``.ci/run`` sets it) every skip, collection-time ones included, is also written to FILE as JSON lines;
``tools/check_skips.py`` then fails CI for any outside ``tests/gpu/``. See docs/testing.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("OMP_NUM_THREADS", "1")

SKIP_REPORT_ENV = "LARGESSL_SKIP_REPORT"
ALLOWED_SKIP_PREFIX = "tests/gpu/"
"""Skips here are expected on a machine without CUDA; any other skip fails CI."""

_skips: list[dict[str, str]] = []


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Train manifest of the digits shards at 16 px, written once per test module (a module may damage its copy).
    Modules that need other sizes or both splits define their own ``digits``."""
    from largessl.data.digits import write_digits_shards

    train, _ = write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)
    return train


@pytest.fixture
def repo_root() -> Path:
    """The repository root."""
    return ROOT


def _nodeid(report: pytest.CollectReport | pytest.TestReport) -> str:
    # Node ids are relative to the rootdir (the repository), so they start with tests/...
    return report.nodeid or str(getattr(report, "fspath", ""))


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _record(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append({"nodeid": _nodeid(report), "reason": _reason(report), "when": report.when
                       if isinstance(report, pytest.TestReport) else "collect"})


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Module-level skips (``importorskip`` at import time) are collection reports."""
    _record(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Skips from marks, fixtures or ``pytest.skip`` inside a test."""
    _record(report)


def _unexpected() -> list[dict[str, str]]:
    return [s for s in _skips if not s["nodeid"].startswith(ALLOWED_SKIP_PREFIX)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the skips that CI would turn into a failure (a developer's `make test` still passes)."""
    bad = _unexpected()
    if bad:
        terminalreporter.section("skips outside tests/gpu/ (CI fails on these)", yellow=True)
        for s in bad:
            terminalreporter.line(f"SKIPPED {s['nodeid']}: {s['reason']}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write the skip report for CI (every skip, one JSON line each; an empty file means none)."""
    path = os.environ.get(SKIP_REPORT_ENV)
    if not path:
        return
    with open(path, "w") as f:
        f.write(json.dumps({"session": "complete", "exitstatus": int(exitstatus)}) + "\n")
        for s in _skips:
            f.write(json.dumps(s) + "\n")
