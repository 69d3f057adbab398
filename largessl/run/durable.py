"""Durable local writes: fsync a file's data and a directory's entries (for atomic rename protocols)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

DISK_FULL = ("disk full (no space left on device); free space on that volume or point checkpoint.dir / "
             "train.run_dir at one with room, then rerun the same command (it resumes from the last checkpoint)")


def storage_error(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` naming ``path``; a full disk says so (the CLI maps every OSError to exit code 3)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(errno.ENOSPC, DISK_FULL, str(path))
    if e.filename:
        return e
    return OSError(e.errno or errno.EIO, e.strerror or str(e), str(path))


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to stable storage (before it is renamed into place or hashed into a marker)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames inside ``path`` durable; silently a no-op where the file system refuses a directory fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
