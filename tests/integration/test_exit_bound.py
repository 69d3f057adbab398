"""No run outlives its error: a storage outage during a checkpoint save ends ``largessl pretrain`` with exit code 3
within a bound, with DataLoader workers (which ignore SIGTERM by design) as without them.

Checkpoints go to a real S3 server (SeaweedFS, started for this test alone) which is killed while the run saves
every step: the upload fails, the run logs its one-line error and must end. Before the fix, with
``data.num_workers=2`` the process logged the error and then hung at interpreter exit, joining a loader worker.
"""

from __future__ import annotations

import time
from pathlib import Path

import cli_runs
import pytest
import servers

from largessl.run import exit_codes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXIT_BOUND_S = 180.0
"""From the outage to the exit: the storage client's own retries (about 20 s here) plus a wide margin."""


@pytest.mark.parametrize("workers", [0, 2])
def test_storage_outage_during_a_save_exits_3_within_the_bound(tmp_path: Path, digits: str, workers: int) -> None:
    try:
        servers.weed_binary()
    except servers.ServerUnavailable as e:
        pytest.skip(f"needs SeaweedFS: {e}")
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    with servers.s3_server() as s3:  # this test's own server: it is killed below
        args = [*cli_runs.SMALL, f"data.train_manifest={digits}", f"train.run_dir={run}",
                f"checkpoint.dir={s3.url('ckpt')}", f"data.endpoint_url={s3.endpoint_url}",
                "checkpoint.every_steps=1", "train.num_steps=400", f"data.num_workers={workers}"]
        (proc,) = cli_runs.start(args, logs, **s3.env())
        try:
            cli_runs.wait_for_step(run, 3, [proc])
            assert s3.process is not None
            s3.process.kill()  # the object store goes away while the run saves every step
            s3.process.wait()
            t0 = time.monotonic()
            (code,) = cli_runs.wait([proc], timeout=EXIT_BOUND_S)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = cli_runs.logs(logs)
    assert code == exit_codes.ENVIRONMENT, f"exit {code} after {elapsed:.0f}s (killed at the bound: a hang)\n{text}"
    assert elapsed < EXIT_BOUND_S
    last = cli_runs.last_line(next(logs.glob("*.log")))
    assert "ERROR largessl: storage error" in last, text
