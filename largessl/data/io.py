"""Opening dataset URLs through fsspec: storage options, per-process filesystems, retries, webdataset openers.

Every URL the data package touches (manifests, shards, list files) goes through :func:`open_url`, so
file://, plain paths, s3://, gs:// and http(s):// behave the same. S3 endpoint and credentials come from
the config or from the standard environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``), read here once per filesystem.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

import fsspec

log = logging.getLogger(__name__)

T = TypeVar("T")

# (pid, protocol, options) -> filesystem. Keyed by pid because s3fs/gcsfs hold an event loop and
# connection pool that must not be shared across fork: each DataLoader worker builds its own.
_FILESYSTEMS: dict[tuple[int, str, str], fsspec.AbstractFileSystem] = {}


def protocol_of(url: str) -> str:
    """``'s3://b/k'`` → ``'s3'``; plain paths → ``'file'``."""
    if "://" not in url:
        return "file"
    proto = url.split("://", 1)[0].lower()
    return {"gcs": "gs", "s3a": "s3", "https": "http"}.get(proto, proto)


def storage_options_for(url: str, endpoint_url: str = "", extra: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec storage options for ``url``: S3 endpoint/credentials from arguments, else the AWS_* environment."""
    env = os.environ if environ is None else environ
    opts: dict[str, Any] = dict(extra or {})
    if protocol_of(url) == "s3":
        endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")
        if endpoint:
            client_kwargs = dict(opts.get("client_kwargs", {}))
            client_kwargs.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = client_kwargs
        if "key" not in opts and env.get("AWS_ACCESS_KEY_ID"):
            opts["key"] = env["AWS_ACCESS_KEY_ID"]
            opts["secret"] = env.get("AWS_SECRET_ACCESS_KEY", "")
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs = dict(opts.get("client_kwargs", {}))
            client_kwargs.setdefault("region_name", region)
            opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``, created once per process (fork-safe for s3fs/gcsfs)."""
    proto = protocol_of(url)
    opts = dict(storage_options or {})
    key = (os.getpid(), proto, repr(sorted(opts.items())))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        try:
            # skip_instance_cache: fsspec's own cache would hand a forked worker its parent's instance
            fs = fsspec.filesystem(proto, skip_instance_cache=True, **opts)
        except ImportError as e:
            raise RuntimeError(
                f"no fsspec implementation for {proto}:// ({e}); install largessl[s3] (s3fs, gcsfs) for s3:// and gs://"
            ) from None
        _FILESYSTEMS[key] = fs
    return fs


def reset_filesystems() -> None:
    """Forget this process's filesystems (called in each DataLoader worker before any I/O)."""
    _FILESYSTEMS.clear()


def strip_protocol(url: str) -> str:
    """Path as the filesystem expects it (``file:///a`` → ``/a``; ``s3://b/k`` → ``b/k``; http unchanged)."""
    if protocol_of(url) == "http":
        return url
    if protocol_of(url) == "file":
        return url[len("file://"):] if url.startswith("file://") else url
    return url.split("://", 1)[1]


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None,
             offset: int = 0) -> IO[bytes]:
    """Open ``url`` with fsspec (no caching layer: shards are read once, front to back).

    ``offset`` (reading only) positions the file there without reading what comes before: a seek on
    local files and object stores (whose reads are then ranged GETs), a ``Range`` request over HTTP.
    An HTTP server that ignores ``Range`` sends the file from its start; callers that seek verify what
    they read (the shard reader checks the sample key against its index) and fall back to scanning.
    """
    fs = filesystem(url, storage_options)
    kwargs: dict[str, Any] = {}
    if protocol_of(url) == "http" and "r" in mode:
        kwargs["block_size"] = 0  # stream the body instead of ranged requests the server may not support
        if offset:
            kwargs["headers"] = {"Range": f"bytes={offset}-"}
            kwargs["size"] = -1  # skips the HEAD request; a stream does not need the size
        return fs.open(strip_protocol(url), mode, **kwargs)
    f = fs.open(strip_protocol(url), mode, **kwargs)
    if offset:
        try:
            f.seek(offset)
        except BaseException:
            f.close()
            raise
    return f


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``url`` exists."""
    return filesystem(url, storage_options).exists(strip_protocol(url))


def join_url(base: str, name: str) -> str:
    """``join_url('s3://b/d', 'x.tar')`` → ``'s3://b/d/x.tar'``; absolute ``name`` URLs are returned as is."""
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(base.rstrip("/"), name) if base else name


def dirname_url(url: str) -> str:
    """Parent of ``url`` keeping the protocol (``s3://b/d/m.json`` → ``s3://b/d``)."""
    return url.rsplit("/", 1)[0] if "/" in url else ""


# ---------------------------------------------------------------------------------------------------
# Transient server errors


TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses a retry may cure: timeouts, throttling (429) and server errors (5xx)."""
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                             "RequestLimitExceeded", "TooManyRequestsException", "ServiceUnavailable",
                             "InternalError", "RequestTimeout", "RequestTimeoutException", "BandwidthLimitExceeded"})
"""S3/GCS error codes of throttling and server trouble (the server is there, it cannot answer now)."""
_CONNECTION_ERRORS = ("ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
                      "ClientOSError", "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                      "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError")
"""aiohttp/botocore exceptions of a connection that failed (not all of them derive from OSError)."""


def _chain(e: BaseException, depth: int = 6) -> list[BaseException]:
    """``e`` and the exceptions it was raised from (fsspec wraps an HTTP 500 into a FileNotFoundError)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < depth and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def http_status(e: BaseException) -> int | None:
    """The HTTP status of a storage client's error (aiohttp, botocore), searched along its cause chain."""
    for x in _chain(e):
        status = getattr(x, "status", None)
        if isinstance(status, int) and 100 <= status < 600 and type(x).__module__.startswith("aiohttp"):
            return status
        response = getattr(x, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
    return None


def _error_code(x: BaseException) -> str:
    response = getattr(x, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_transient(e: BaseException) -> bool:
    """True for errors a retry may cure: 5xx, 429, throttling codes, timeouts and dropped connections.

    A definite answer of the server (404, 403, ...) is not transient: retrying cannot make a missing file exist.
    """
    for x in _chain(e):
        status = http_status(x) if x is e else None
        if status is not None:
            return status in TRANSIENT_STATUS
        if _error_code(x) in TRANSIENT_CODES:
            return True
        if isinstance(x, (ConnectionError, TimeoutError)) or type(x).__name__ in _CONNECTION_ERRORS:
            return True
    return False


def describe_error(e: BaseException) -> str:
    """``HTTP 503 (ClientResponseError: ...)`` or ``ConnectionResetError: ...`` for messages."""
    status = http_status(e)
    return f"{'HTTP ' + str(status) + ' ' if status else ''}({type(e).__name__}: {e})"


def retryable(e: BaseException) -> bool:
    """A storage error worth another attempt: :func:`is_transient`, or an ``OSError``/``EOFError`` that is not a
    definite answer (missing file, permission denied)."""
    if is_transient(e):
        return True
    return isinstance(e, (OSError, EOFError)) and not isinstance(e, (FileNotFoundError, PermissionError,
                                                                      IsADirectoryError, NotADirectoryError))


def with_retries(fn: Callable[[], T], what: str, retries: int, backoff_s: float) -> T:
    """Call ``fn`` up to ``retries`` times with exponential backoff on storage errors (OSError, EOF, timeouts,
    5xx/429 and throttling: :func:`is_transient`); re-raise the last error. Bugs (TypeError...) propagate."""
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except Exception as e:
            if not retryable(e):
                raise
            if attempt == retries:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt, retries,
                        describe_error(e), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def probe(url: str, storage_options: Mapping[str, Any] | None = None, retries: int = 3,
          backoff_s: float = 1.0) -> bool:
    """True when ``url`` exists, False when the server says it does not (404, no such key). A server that keeps
    failing (5xx, throttling, no connection) raises ``RuntimeError`` after ``retries`` attempts, saying so: a
    flaky server is not a missing file."""
    fs = filesystem(url, storage_options)
    path = strip_protocol(url)

    def ask() -> bool:
        try:
            if protocol_of(url) == "http":
                return bool(fs.exists(path, strict=True))  # strict: a 500 raises instead of reading as "missing"
            fs.info(path)
            return True
        except FileNotFoundError as e:
            if is_transient(e):  # fsspec's HTTP info wraps a 500 into FileNotFoundError
                raise
            return False

    try:
        return with_retries(ask, f"checking {url}", max(1, retries), backoff_s)
    except Exception as e:
        if not retryable(e):
            raise
        raise RuntimeError(f"cannot tell whether {url} exists: the server failed {max(1, retries)} time(s), last "
                           f"with {describe_error(e)}; it is not reported missing. Retry when the server is back"
                           ) from e


def _fsspec_pipe_opener(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    return open_url(url, mode, storage_options_for(url))


def register_webdataset_openers() -> None:
    """Let ``webdataset.WebDataset('s3://...')`` / ``gs://`` open URLs through fsspec (it has no opener for them)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` the attribute is a function
    for scheme in ("s3", "gs", "gcs"):
        gopen.gopen_schemes[scheme] = _fsspec_pipe_opener
