"""The pretraining completion marker: written when a run reached its last step, waited on by stage jobs.

``pretrain-complete.json`` (step, checkpoint, time) is written by rank 0 after the final checkpoint, into the run
directory and, when checkpoints live elsewhere (``checkpoint.dir=s3://...``), into the checkpoint directory too:
the stage jobs find it wherever their ``--checkpoint`` points. A restart removes it before training again (an
extended run is not complete any more). Kubernetes stage Jobs wait for it in an init container
(``largessl launch wait``), so applying every manifest at once never starts an evaluation on an unfinished run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from largessl.data import io
from largessl.run.layout import COMPLETE_FILE

log = logging.getLogger(__name__)


def marker_url(location: str | os.PathLike[str]) -> str:
    """``<location>/pretrain-complete.json`` (a local path or an fsspec URL)."""
    return f"{str(location).rstrip('/')}/{COMPLETE_FILE}"


def _options(url: str, endpoint_url: str) -> dict[str, Any]:
    return io.storage_options_for(url, endpoint_url)


def write_marker(location: str | os.PathLike[str], record: dict[str, Any], endpoint_url: str = "") -> None:
    """Write the marker atomically (temp file + rename locally; one PUT on object storage)."""
    url = marker_url(location)
    text = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    if io.protocol_of(url) == "file":
        path = Path(io.strip_protocol(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    io.filesystem(url, _options(url, endpoint_url)).pipe_file(io.strip_protocol(url), text)


def remove_marker(location: str | os.PathLike[str], endpoint_url: str = "") -> None:
    """Remove the marker if there is one (the run is about to train again)."""
    url = marker_url(location)
    fs = io.filesystem(url, _options(url, endpoint_url))
    try:
        fs.rm(io.strip_protocol(url))
    except FileNotFoundError:
        pass


def read_marker(location: str | os.PathLike[str], endpoint_url: str = "") -> dict[str, Any] | None:
    """The marker's content, or None while the run is not complete."""
    url = marker_url(location)
    fs = io.filesystem(url, _options(url, endpoint_url))
    path = io.strip_protocol(url)
    if io.protocol_of(url) != "file":
        fs.invalidate_cache()  # listings are cached by s3fs: a waiter must look afresh
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # not a marker we wrote (ours are written whole): keep waiting
    return data if isinstance(data, dict) else None


def wait_for_marker(location: str | os.PathLike[str], poll_s: float = 30.0, timeout_s: float = 0.0,
                    endpoint_url: str = "") -> dict[str, Any]:
    """Block until ``location`` holds the marker; returns it. ``timeout_s`` > 0 raises ``TimeoutError`` after that
    long. Storage errors while polling are logged and retried (the next poll)."""
    start = time.monotonic()
    first = True
    while True:
        try:
            found = read_marker(location, endpoint_url)
        except (OSError, RuntimeError) as e:
            log.warning("cannot read %s yet (%s: %s); retrying in %.0fs", marker_url(location), type(e).__name__, e,
                        poll_s)
            found = None
        if found is not None:
            log.info("pretraining is complete (%s, step %s)", marker_url(location), found.get("step"))
            return found
        if first:
            log.info("waiting for %s (pretraining not complete yet; polling every %.0fs)", marker_url(location),
                     poll_s)
            first = False
        if timeout_s > 0 and time.monotonic() - start >= timeout_s:
            raise TimeoutError(f"{marker_url(location)} did not appear within {timeout_s:.0f}s: pretraining has not "
                               "completed")
        time.sleep(poll_s)
