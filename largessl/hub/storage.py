"""Where a hub's bytes live, and the one primitive its publishing protocol needs: compare-and-swap of an object.

- :class:`LocalStorage` (a directory, also on a shared file system): every write is a temp file + fsync +
  rename; commits run under an exclusive ``flock`` on ``<root>/.hub.lock``, and a version folder is staged
  under a unique name and renamed into place inside that lock.
- :class:`S3Storage` (``s3://``): S3 conditional writes. ``PutObject`` with ``If-None-Match: *`` creates an
  object only if it does not exist, ``If-Match: <etag>`` replaces it only if nobody replaced it since it
  was read; the server decides atomically (412 Precondition Failed otherwise). SeaweedFS, AWS S3 (since
  2024), MinIO and Ceph RGW implement both. A store that silently ignores the headers would make the
  protocol unsafe, so :meth:`S3Storage.check_conditional_writes` proves once per process that a second
  ``If-None-Match`` write is refused before anything is written.
- :class:`PlainStorage` (any other fsspec URL: gs://, memory://, ...): no compare-and-swap, so it only
  writes when the hub is opened with ``single_writer=True`` (one process ever pushes).

See :mod:`largessl.hub.store` for the protocol built on these and docs/hub.md for why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from largessl.run.durable import fsync_dir, fsync_file

log = logging.getLogger(__name__)

LOCK_FILE = ".hub.lock"


class Storage:
    """Object-level access under a hub root; paths are relative to the root with '/' separators."""

    url: str
    needs_claims = False
    """True where concurrent pushes of one version are told apart with claim objects (no global lock)."""

    def read(self, rel: str) -> bytes:
        """Bytes of ``rel`` (FileNotFoundError when absent)."""
        raise NotImplementedError

    def read_versioned(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, token) of ``rel`` read together, or (None, None) when absent; the token names that content.

        Default: the token is the sha256 of the bytes (stores with ETags override this and :meth:`token`).
        """
        try:
            data = self.read(rel)
        except FileNotFoundError:
            return None, None
        return data, _sha256(data)

    def token(self, rel: str) -> str | None:
        """The current token of ``rel`` (None when absent); the default reads the bytes to hash them."""
        return self.read_versioned(rel)[1]

    def write(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` as a whole (readers see the old or the new bytes, never a mix)."""
        raise NotImplementedError

    def write_if(self, rel: str, data: bytes, token: str | None) -> str | None:
        """Write ``rel`` only if its token is still ``token`` (None: only if absent); the new token, or None."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove one object if present."""
        raise NotImplementedError

    def stage_version(self, name: str, version: str, push_id: str, files: Mapping[str, str | os.PathLike[str]],
                      card_name: str, card_raw: bytes) -> str:
        """Upload a version's files, then its card, to a place nobody else writes; returns that place."""
        raise NotImplementedError

    def finalize_version(self, staged: str, name: str, version: str) -> str:
        """Move a staged version to where the index will point (called inside :meth:`lock`)."""
        return staged

    def discard(self, staged: str) -> None:
        """Best-effort removal of a staged version that will not be published."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive section for commits where the storage has one (a local directory); else nothing."""
        yield


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStorage(Storage):
    """A hub in a local (or shared) directory."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = str(root)
        self._lock_depth = 0
        self._lock_file: Any = None
        self._thread_lock = threading.RLock()

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes:
        """Bytes of ``rel``."""
        return self._p(rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        """Temp file + fsync + rename, so readers never see half a file."""
        p = self._p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(p.parent)

    def write_if(self, rel: str, data: bytes, token: str | None) -> str | None:
        """Compare and write under the hub lock."""
        with self.lock():
            if self.token(rel) != token:
                return None
            self.write(rel, data)
            return _sha256(data)

    def delete(self, rel: str) -> None:
        """Remove one file if present."""
        self._p(rel).unlink(missing_ok=True)

    def stage_version(self, name: str, version: str, push_id: str, files: Mapping[str, str | os.PathLike[str]],
                      card_name: str, card_raw: bytes) -> str:
        """Copy into ``models/<name>/.staging-<version>-<push id>`` (outside the lock: copies can be large)."""
        rel = f"models/{name}/.staging-{version}-{push_id}"
        staging = self._p(rel)
        try:
            for frel, src in files.items():
                (staging / frel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, staging / frel)
                fsync_file(staging / frel)
            (staging / card_name).write_bytes(card_raw)
            fsync_file(staging / card_name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return rel

    def finalize_version(self, staged: str, name: str, version: str) -> str:
        """Rename the staging folder to ``models/<name>/<version>`` (an unlisted folder there is a crash's)."""
        assert self._lock_depth > 0, "finalize_version runs inside the hub lock"
        rel = f"models/{name}/{version}"
        final = self._p(rel)
        if final.exists():
            # under the lock, and the version is not in the index: a push that crashed before its commit
            log.warning("removing unpublished leftovers of an interrupted push at %s", final)
            shutil.rmtree(final)
        os.rename(self._p(staged), final)
        fsync_dir(final.parent)
        return rel

    def discard(self, staged: str) -> None:
        """Remove a staging folder."""
        shutil.rmtree(self._p(staged), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive ``flock`` on ``<root>/.hub.lock`` (re-entrant within this object)."""
        with self._thread_lock:
            if self._lock_depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                f = open(self.root / LOCK_FILE, "a+b")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX)
                except BaseException:
                    f.close()
                    raise
                self._lock_file = f
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None






class PlainStorage(Storage):
    """Any fsspec URL without compare-and-swap: reads always, writes only for a single-writer hub."""

    def __init__(self, url: str, fs: Any, root: str, single_writer: bool) -> None:
        self.url, self.fs, self.root, self.single_writer = url, fs, root, single_writer

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _check_writable(self) -> None:
        if not self.single_writer:
            raise RuntimeError(
                f"hub {self.url}: this storage offers no conditional writes, so concurrent pushes could lose "
                "versions. Use an s3:// hub (conditional writes) or a directory (file lock), or open the hub "
                "with single_writer=True (CLI: --single-writer) if only one process ever pushes or yanks")

    def read(self, rel: str) -> bytes:
        """Bytes of ``rel``."""
        return self.fs.cat_file(self._p(rel))

    def write(self, rel: str, data: bytes) -> None:
        """One PUT."""
        self._check_writable()
        self.fs.pipe_file(self._p(rel), data)

    def write_if(self, rel: str, data: bytes, token: str | None) -> str | None:
        """Compare then write (not atomic: single writer only)."""
        self._check_writable()
        if self.token(rel) != token:
            return None
        self.fs.pipe_file(self._p(rel), data)
        return _sha256(data)

    def delete(self, rel: str) -> None:
        """Remove one object if present."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._p(rel))

    def stage_version(self, name: str, version: str, push_id: str, files: Mapping[str, str | os.PathLike[str]],
                      card_name: str, card_raw: bytes) -> str:
        """Upload under ``models/<name>/<version>/<push id>/``, the card last."""
        self._check_writable()
        rel = f"models/{name}/{version}/{push_id}"
        for frel, src in files.items():
            self.fs.put_file(str(src), self._p(f"{rel}/{frel}"))
        self.fs.pipe_file(self._p(f"{rel}/{card_name}"), card_raw)
        return rel

    def discard(self, staged: str) -> None:
        """Remove a staged prefix."""
        try:
            self.fs.rm(self._p(staged), recursive=True)
        except (FileNotFoundError, OSError) as e:
            log.warning("could not remove the unpublished upload %s (%s); it is never read", staged, e)


class S3Storage(PlainStorage):
    """An s3:// hub: compare-and-swap with S3 conditional writes through a botocore client."""

    needs_claims = True
    _checked: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) -> conditional writes proven this process

    def __init__(self, url: str, fs: Any, root: str, storage_options: Mapping[str, Any], single_writer: bool) -> None:
        super().__init__(url, fs, root, single_writer)
        self.bucket, _, prefix = root.partition("/")
        self.prefix = prefix.strip("/")
        self.options = dict(storage_options)
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """A botocore S3 client from the same endpoint and credentials as the fsspec filesystem."""
        with self._client_lock:
            if self._client is None:
                self._client = _botocore_client(self.options)
            return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _check_writable(self) -> None:
        if not self.single_writer:
            self.check_conditional_writes()

    def _error(self, e: Exception, what: str) -> RuntimeError:
        return RuntimeError(f"hub {self.url}: {what} failed: {e}")

    def read(self, rel: str) -> bytes:
        """GET (FileNotFoundError when absent)."""
        data, _ = self.read_versioned(rel)
        if data is None:
            raise FileNotFoundError(f"{self.url}/{rel}")
        return data

    def read_versioned(self, rel: str) -> tuple[bytes | None, str | None]:
        """One GET: the bytes and the ETag of exactly those bytes."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as e:
            if _codes(e) & {"NoSuchKey", "404", "NotFound"}:
                return None, None
            raise self._error(e, f"reading {rel}") from None
        except BotoCoreError as e:
            raise self._error(e, f"reading {rel}") from None
        with contextlib.closing(resp["Body"]) as body:
            return body.read(), resp["ETag"]

    def token(self, rel: str) -> str | None:
        """HEAD: the current ETag."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ETag"]
        except ClientError as e:
            if _codes(e) & {"NoSuchKey", "404", "NotFound"}:
                return None
            raise self._error(e, f"reading {rel}") from None
        except BotoCoreError as e:
            raise self._error(e, f"reading {rel}") from None

    def write(self, rel: str, data: bytes) -> None:
        """One unconditional PUT (pages: rewritten from the index, see the store's refresh loop)."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._check_writable()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"writing {rel}") from None

    def write_if(self, rel: str, data: bytes, token: str | None) -> str | None:
        """PUT with If-None-Match: * (token None) or If-Match: token; None when the server refuses (412/409)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self.single_writer:
            return super().write_if(rel, data, token)
        self._check_writable()
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)
        except ClientError as e:
            # 412: the precondition did not hold; 409: another conditional write to the key is in flight (AWS);
            # 404: If-Match on a key that was deleted meanwhile
            if _codes(e) & {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}:
                return None
            raise self._error(e, f"writing {rel}") from None
        except BotoCoreError as e:
            raise self._error(e, f"writing {rel}") from None
        return resp["ETag"]

    def delete(self, rel: str) -> None:
        """DELETE (absent keys are fine)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        except (ClientError, BotoCoreError) as e:
            log.warning("hub %s: could not delete %s (%s)", self.url, rel, e)

    def check_conditional_writes(self) -> None:
        """Prove once per process that this store refuses a second If-None-Match write (else RuntimeError)."""
        key = (str(self.options.get("client_kwargs", {}).get("endpoint_url", "")), self.bucket)
        if S3Storage._checked.get(key):
            return
        from botocore.exceptions import BotoCoreError, ClientError

        probe = self._key(f".largessl/probe-{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                honoured = False
            except ClientError as e:
                if not _codes(e) & {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                    raise
                honoured = True
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "checking for S3 conditional writes") from None
        finally:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.delete_object(Bucket=self.bucket, Key=probe)
        if not honoured:
            raise RuntimeError(
                f"hub {self.url}: the S3 store ignores If-None-Match (a second conditional PUT succeeded), so "
                "concurrent pushes cannot be made safe there. Use a store with S3 conditional writes (AWS S3, "
                "MinIO, Ceph RGW, SeaweedFS) or, if only one process ever pushes, --single-writer")
        S3Storage._checked[key] = True


def _codes(e: Exception) -> set[str]:
    """The S3 error code and the HTTP status of a botocore ClientError, as strings."""
    err = getattr(e, "response", {}) or {}
    return {str(err.get("Error", {}).get("Code", "")), str(err.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))}


_CLIENTS: dict[tuple[int, str], Any] = {}  # (pid, options) -> client: building one parses the S3 model (~0.3 s)
_CLIENTS_LOCK = threading.Lock()


def _botocore_client(options: Mapping[str, Any]) -> Any:
    """A botocore S3 client for fsspec/s3fs ``storage_options`` (endpoint, region, key/secret/token, config).

    Cached per process and options (botocore clients are thread-safe; a forked child builds its own).
    """
    key = (os.getpid(), repr(sorted(options.items())))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = _new_botocore_client(options)
        return _CLIENTS[key]


def _new_botocore_client(options: Mapping[str, Any]) -> Any:
    try:
        import botocore.config
        import botocore.session
    except ImportError as e:
        raise RuntimeError(f"an s3:// hub needs botocore ({e}); install largessl[s3]") from None
    ck = dict(options.get("client_kwargs", {}))
    config_kwargs = dict(options.get("config_kwargs", {}))
    config_kwargs.setdefault("retries", {"mode": "standard", "max_attempts": 5})
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=ck.get("endpoint_url") or None, region_name=ck.get("region_name") or None,
        aws_access_key_id=options.get("key") or None, aws_secret_access_key=options.get("secret") or None,
        aws_session_token=options.get("token") or None, config=botocore.config.Config(**config_kwargs))
