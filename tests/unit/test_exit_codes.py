"""The exception → exit code mapping of the CLI, and the stall watchdog that turns a hang into exit code 3."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from largessl.cli import exit_code_for, is_storage_error
from largessl.distributed.env import StallWatchdog, configure_nccl_error_handling, stall_timeout_s
from largessl.run import exit_codes


def _botocore_error() -> BaseException:
    botocore = pytest.importorskip("botocore.exceptions", reason="botocore comes with the s3 extra (s3fs)")
    return botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


@pytest.mark.parametrize("make,code,words", [
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"), 3,
     ["disk full", "/runs/x/model.safetensors"]),
    (lambda: OSError(errno.ENOSPC, "No space left on device"), 3, ["disk full", "path not reported"]),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/runs/x"), 3, ["PermissionError", "/runs/x"]),
    (lambda: OSError(errno.ESTALE, "Stale file handle", "/nfs/run"), 3, ["Stale file handle", "/nfs/run"]),
    (lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "s3://b/k"), 3, ["s3://b/k"]),
    (_botocore_error, 3, ["EndpointConnectionError", "127.0.0.1:1"]),
    (lambda: __import__("fsspec.exceptions").exceptions.FSTimeoutError(), 3, ["FSTimeoutError"]),
    (lambda: ValueError("train.global_batch_size must be >= 2\n(got 1)"), 2, ["global_batch_size must be >= 2 (got 1)"]),
    (lambda: RuntimeError("rendezvous failed"), 3, ["rendezvous failed"]),
    (lambda: FloatingPointError("loss is nan at step 7"), 4, ["diverged", "step 7"]),
    (lambda: IndexError("list index out of range"), 1, ["IndexError", "list index out of range", "a bug"]),
    (lambda: AssertionError((10, 9)), 1, ["AssertionError", "(10, 9)"]),
    (lambda: TypeError("unsupported operand"), 1, ["TypeError"]),
    (lambda: KeyboardInterrupt(), 130, ["interrupted"]),
], ids=["enospc", "enospc-no-path", "permission", "stale-nfs", "missing", "botocore", "fsspec-timeout", "value",
        "runtime", "diverged", "index", "assert", "type", "ctrl-c"])
def test_exception_to_exit_code(make, code, words) -> None:
    got, message = exit_code_for(make())
    assert got == code
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_storage_errors_are_recognised_by_type_not_text() -> None:
    assert is_storage_error(OSError("x")) and is_storage_error(_botocore_error())
    assert not is_storage_error(RuntimeError("s3 connection failed"))  # RuntimeError is 3 anyway, by its own rule
    assert not is_storage_error(ValueError("bad url"))
    assert exit_codes.RETRY_FREE == (exit_codes.REQUEUE,)


def test_nccl_error_handling_respects_the_user() -> None:
    env: dict[str, str] = {}
    assert configure_nccl_error_handling(env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert configure_nccl_error_handling(env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def test_stall_timeout_default_is_five_minutes() -> None:
    from largessl.distributed.config import DistConfig

    assert stall_timeout_s(DistConfig().timeout_minutes) == 300.0
    assert stall_timeout_s(0.25) == 30.0


def test_watchdog_beats_pause_and_expiry() -> None:
    """Driven by a fake clock: the test sets the time and waits for the watchdog thread to have checked it, so a
    loaded machine (a late thread, a long sleep) cannot make it pass or fail by accident."""
    import time

    now = [0.0]
    fired: list[str] = []
    wd = StallWatchdog(0.3, poll_s=0.001, on_expire=fired.append, clock=lambda: now[0]).start()

    def at(t: float) -> None:  # move the clock to t, then wait for two checks that start after the move (or a fire)
        now[0] = t
        target, deadline = wd.polls + 2, time.monotonic() + 60
        while wd.polls < target and not fired:
            assert time.monotonic() < deadline, "the watchdog thread stopped checking"
            time.sleep(0.001)

    at(100.0)
    assert not fired  # not armed before the first beat (start-up, resume, the first compile)
    wd.beat()
    at(100.25)
    assert not fired  # within the limit
    with wd.paused():
        at(200.0)  # checkpoint I/O does not count
    assert not fired
    at(200.25)
    assert not fired  # the limit counts from the end of the pause
    at(200.35)
    wd.stop()
    assert len(fired) == 1 and "peer rank died or hangs" in fired[0]


def test_watchdog_ends_a_stuck_process_with_exit_code_3() -> None:
    """A main thread stuck in a call nothing interrupts (here: a lock nobody releases) still ends, with 3."""
    code = textwrap.dedent("""
        import logging, threading
        from largessl.distributed.env import StallWatchdog
        logging.basicConfig(level=logging.INFO)
        wd = StallWatchdog(0.5, poll_s=0.05).start()
        wd.beat()
        lock = threading.Lock(); lock.acquire(); lock.acquire()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == exit_codes.ENVIRONMENT, res.stderr
    assert "no training step completed" in res.stderr and "(exit code 3)" in res.stderr


def test_a_full_disk_under_metrics_jsonl_names_the_file(tmp_path) -> None:
    """A write to metrics.jsonl on a full volume (here /dev/full, which answers every write with ENOSPC) is exit 3
    naming metrics.jsonl; the OSError of a buffered write carries no path by itself ("path not reported")."""
    from pathlib import Path

    from largessl.run.sinks import JsonlSink

    if not Path("/dev/full").exists():
        pytest.skip("this machine has no /dev/full to fill")
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink._f.close()
    sink._f = open("/dev/full", "w", encoding="utf-8")  # the volume fills up under the open file
    with pytest.raises(OSError) as e:
        sink.write({"step": 1, "loss": 1.0})
    code, message = exit_code_for(e.value)
    assert code == exit_codes.ENVIRONMENT
    assert message.startswith("disk full") and message.endswith(str(tmp_path / "metrics.jsonl")), message
    assert "path not reported" not in message
    with pytest.raises(OSError) as e:  # closing flushes the same bytes into the same full volume
        sink.close()
    assert e.value.filename == str(tmp_path / "metrics.jsonl")
