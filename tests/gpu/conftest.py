"""The GPU tier: every test here is marked ``gpu`` and skipped, with the reason printed, without CUDA.

Run it with ``make gpu-test`` on a machine with one or more GPUs (it needs one). CI has no GPU, so CI
only imports these modules; the tier exists for the GPU acceptance run (docs/benchmarks.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = ("no CUDA device (torch.cuda.is_available() is False): the GPU tier runs only on a GPU machine; "
              "use `make gpu-test` there")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Digits shards (train/ and val/ manifests) written once for the tier."""
    dest = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "largessl", "shards", "digits", str(dest)], check=True,
                   capture_output=True, timeout=300)
    yield dest
