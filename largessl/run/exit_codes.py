"""Process exit codes shared by the CLI and the launchers (SLURM requeue, Kubernetes podFailurePolicy).

:func:`exit_code_for` maps the exception that ended a command to one of these (the CLI prints it and exits with
it; the trainer records it in ``state.json`` for ``largessl status``).
"""

import errno

OK = 0
"""Finished."""
UNEXPECTED = 1
"""An unexpected exception (a bug: IndexError, AssertionError, TypeError ...): do not retry blindly. The log holds
the traceback; the last line names the error."""
BAD_INPUT = 2
"""Bad config, data, checkpoint or arguments (ValueError): retrying cannot help."""
ENVIRONMENT = 3
"""The environment failed: storage (any OSError -- a full disk, a stale NFS handle, permissions -- and fsspec,
s3fs, gcsfs or botocore errors), a dead or hung peer rank (collective timeout, connection closed, the stall
watchdog), rendezvous, a missing shard (RuntimeError). A retry may help; it resumes from the last checkpoint."""
DIVERGED = 4
"""The loss or embeddings became NaN/Inf (FloatingPointError): retrying the same run cannot help."""
COLLAPSED = 5
"""The collapse guard stopped the run (train.collapse_guard): its embeddings collapsed; a checkpoint was saved and
state.json says why. Retrying the same run cannot help."""
REQUEUE = 75
"""Stopped on a signal after saving a checkpoint: requeue/restart the same command to resume (EX_TEMPFAIL)."""

FAIL_FAST = (UNEXPECTED, BAD_INPUT, DIVERGED, COLLAPSED)
"""Codes a scheduler should not retry."""
RETRY_FREE = (REQUEUE,)
"""Codes a scheduler should restart without counting a failure (Kubernetes podFailurePolicy: Ignore)."""

STORAGE_MODULES = ("fsspec", "s3fs", "gcsfs", "botocore", "aiobotocore", "boto3", "google.auth", "google.api_core",
                   "google.cloud", "aiohttp", "urllib3", "requests")
"""Packages whose exceptions are storage/network failures even when they do not derive from OSError."""


def is_storage_error(e: BaseException) -> bool:
    """OSError (disk full, stale NFS handle, permissions, connection) or an exception of a storage client."""
    if isinstance(e, OSError):
        return True
    return any(c.__module__ == m or c.__module__.startswith(m + ".") for c in type(e).__mro__ for m in STORAGE_MODULES)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def exit_code_for(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that escaped a command."""
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, FloatingPointError):
        return DIVERGED, _one_line(f"training diverged: {e}")
    if is_storage_error(e):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = e.strerror if e.strerror and "disk full" in e.strerror else "disk full (no space left on device)"
            return ENVIRONMENT, _one_line(f"{what}: {e.filename or 'path not reported'}")
        if isinstance(e, OSError) and e.strerror and e.filename:
            detail = f"{e.strerror}: {e.filename}"
        else:
            detail = str(e) or type(e).__name__
        return ENVIRONMENT, _one_line(f"storage error ({type(e).__name__}): {detail}")
    if isinstance(e, ValueError):
        return BAD_INPUT, _one_line(str(e))
    if isinstance(e, RuntimeError):
        return ENVIRONMENT, _one_line(str(e))
    return UNEXPECTED, _one_line(f"unexpected error (a bug; the traceback is above): "
                                            f"{type(e).__name__}: {e}")
