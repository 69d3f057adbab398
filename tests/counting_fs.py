"""A real fsspec filesystem that counts the bytes read from every file: ``counting:///abs/path``.

It is the local filesystem (fsspec's ``LocalFileSystem``) with every file opened for reading wrapped so
that ``read``/``readinto``/``readline`` add to a per-process counter. Tests point ``checkpoint.dir`` at
``counting://<tmp>`` and read :data:`BYTES_READ` after a resume; the checkpoint code cannot tell it
from any other fsspec URL.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "counting"
BYTES_READ: Counter[str] = Counter()
"""Bytes read in this process, by absolute path."""


class _CountedFile:
    """Delegates to the real file object and counts what is read through it."""

    def __init__(self, f: Any, path: str) -> None:
        self._f = f
        self._path = path

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        BYTES_READ[self._path] += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        BYTES_READ[self._path] += n or 0
        return n

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        BYTES_READ[self._path] += len(data)
        return data

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def __enter__(self) -> _CountedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class CountingFileSystem(LocalFileSystem):
    """``counting:///path`` = the local ``/path``, with bytes read counted."""

    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        f = super()._open(path, mode, *args, **kwargs)
        return _CountedFile(f, self._strip_protocol(path)) if "r" in mode else f


def register() -> None:
    """Make ``counting://`` known to fsspec in this process (each test process calls it)."""
    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


def reset() -> None:
    """Forget the counts."""
    BYTES_READ.clear()
