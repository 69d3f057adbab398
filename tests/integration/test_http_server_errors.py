"""Transient HTTP server errors (5xx, 429) are retried with backoff, like dropped connections, and the start-up
check tells a missing shard (404: bad input, exit 2) from a failing server (5xx: exit 3, retry later).

The server is Python's http.server with a handler that answers 503/500/429 to the first requests of chosen files
(or to every request), then serves them: what a flaky object-store gateway or CDN does."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from largessl.cli import exit_code_for, main
from largessl.data.config import DataConfig
from largessl.data.manifest import read_manifest
from largessl.data.stream import build_eval_stream
from largessl.run import exit_codes


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Fails the first ``fail_first`` GET/HEAD of each path ending in one of ``suffixes`` with ``status``."""

    status = 503
    fail_first = 2
    suffixes: tuple[str, ...] = (".tar",)
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def _maybe_fail(self) -> bool:
        path = self.path.split("?", 1)[0]
        if not path.endswith(self.suffixes):
            return False
        with self.lock:
            self.seen[path] += 1
            n = self.seen[path]
        if self.fail_first < 0 or n <= self.fail_first:
            self.send_response(self.status)
            self.send_header("Content-Length", "0")
            if self.status in (429, 503):
                self.send_header("Retry-After", "0")
            self.end_headers()
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._maybe_fail():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if not self._maybe_fail():
            super().do_HEAD()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def digits_www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("www")
    assert main(["shards", "digits", str(root / "d"), "--image-size", "16"]) == 0
    return root


@pytest.fixture
def flaky(digits_www: Path, tmp_path: Path) -> Iterator[tuple[str, Path, type[_Flaky]]]:
    import shutil

    root = tmp_path / "www"
    shutil.copytree(digits_www, root)  # a test may delete a shard
    handler = type("Handler", (_Flaky,), {"seen": Counter()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root, handler
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _read_all(url: str, handler: type[_Flaky]) -> int:
    """Samples read by three ranks: ranks 1 and 2 start inside a shard (the digits val set has shards of 179, 179
    and 1 samples), so their first request is a ranged GET without a HEAD, where fsspec raises aiohttp's
    ClientResponseError itself (at offset 0 it wraps the error into a FileNotFoundError, an OSError)."""
    manifest = read_manifest(url, check_shards=False)
    cfg = DataConfig(augment="none", image_size=16, num_workers=0, retries=4, retry_backoff_s=0.01)
    n = 0
    for rank in range(3):
        handler.seen.clear()  # each rank meets the failing answers on its own first requests
        stream = build_eval_stream(cfg, manifest, batch_size=30, rank=rank, world_size=3)
        n += sum(len(b.keys) for b in stream.iterate(0))
    return n


@pytest.mark.parametrize("status", [503, 500, 429])
def test_shard_reads_retry_server_errors(flaky, status: int, caplog: pytest.LogCaptureFixture) -> None:
    base, root, handler = flaky
    handler.status, handler.fail_first = status, 2  # every shard: two failed answers, then its bytes
    url = f"{base}/d/val/manifest.json"
    expected = read_manifest(str(root / "d" / "val" / "manifest.json")).num_samples
    with caplog.at_level(logging.WARNING):
        n = _read_all(url, handler)
    assert n == expected  # nothing skipped, nothing lost
    assert "skipping shard" not in caplog.text and "retry 1/3" in caplog.text
    tars = [count for path, count in handler.seen.items() if path.endswith(".tar")]
    assert tars and all(count >= 3 for count in tars)  # rank 1's shards: two failed answers, then the bytes


def test_startup_check_tells_missing_from_server_error(flaky) -> None:
    base, root, handler = flaky
    url = f"{base}/d/val/manifest.json"
    handler.status, handler.fail_first = 503, 1
    assert read_manifest(url).num_samples > 0  # a blip is retried (3 attempts, 1 s backoff by default)
    handler.status, handler.fail_first = 500, -1  # the server is broken: every answer is 500
    with pytest.raises(RuntimeError, match=r"cannot tell whether .*\.tar exists: the server failed 3 time\(s\), "
                                           r"last with HTTP 500") as e:
        read_manifest(url)
    assert "does not exist" not in str(e.value)
    assert exit_code_for(e.value)[0] == exit_codes.ENVIRONMENT  # retry later
    handler.fail_first = 0  # the server is fine; one shard really is gone
    victim = read_manifest(str(root / "d" / "val" / "manifest.json")).shards[0].url
    Path(victim).unlink()
    with pytest.raises(ValueError, match=f"{Path(victim).name} listed in manifest .* does not exist") as e:
        read_manifest(url)
    assert exit_code_for(e.value)[0] == exit_codes.BAD_INPUT


def test_a_failing_manifest_server_is_3_and_a_missing_manifest_is_2(flaky) -> None:
    base, _, handler = flaky
    handler.suffixes, handler.status, handler.fail_first = ("manifest.json",), 502, -1
    with pytest.raises(RuntimeError, match="server kept failing") as e:
        read_manifest(f"{base}/d/val/manifest.json", retries=2, backoff_s=0.01)
    assert exit_code_for(e.value)[0] == exit_codes.ENVIRONMENT
    handler.fail_first = 0  # the server answers again: a manifest that is not there is a 404
    with pytest.raises(ValueError, match="does not exist") as e:
        read_manifest(f"{base}/d/nowhere/manifest.json", retries=2, backoff_s=0.01)
    assert exit_code_for(e.value)[0] == exit_codes.BAD_INPUT
