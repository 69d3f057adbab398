"""Fixtures for integration tests: real S3 (SeaweedFS) and HTTP servers the tests start and stop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import servers


@pytest.fixture(scope="session")
def s3_server() -> Iterator[servers.S3Server]:
    """Session-wide SeaweedFS S3 server: ``endpoint_url``, ``key``, ``secret``, ``bucket``, ``storage_options()``,
    ``env()``, ``url(...)``. Skips, printing the reason, when `weed` is not installed."""
    try:
        servers.weed_binary()
    except servers.ServerUnavailable as e:
        pytest.skip(f"S3 integration tests need SeaweedFS: {e}")
    with servers.s3_server() as server:
        yield server


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[servers.HTTPServer]:
    """An HTTP server for ``tmp_path/www`` (write files there; ``.url`` is the base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with servers.http_server(root) as srv:
        yield srv
