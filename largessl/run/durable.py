"""Durable local writes: fsync a file's data and a directory's entries (for atomic rename protocols)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

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


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON via a temp file, fsync and rename: readers see the old file or the new one,
    never half of one, and a crash right after leaves the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> str:
    """Save a matplotlib figure as PNG via a temp file and rename, then close it (readers never see half a plot)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)
