"""Trackers against the real thing: an MLflow tracking server started here on 127.0.0.1, and W&B in offline mode
with the files it writes read back. Through real ``largessl pretrain`` processes: the same scalars as
metrics.jsonl, the config as params, a SIGTERM + rerun continues the same tracker run, the hub version is tagged,
and a tracker outage mid-run only warns (training finishes, exit 0)."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cli_runs
import pytest

from largessl.cli import main
from largessl.distributed.env import free_port
from largessl.run import exit_codes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
mlflow = pytest.importorskip("mlflow", reason="the trackers extra is not installed (pip install 'largessl[trackers]')")
wandb = pytest.importorskip("wandb", reason="the trackers extra is not installed (pip install 'largessl[trackers]')")

TRACKED = [*cli_runs.SMALL, "train.log_every=5", "data.num_workers=0", "checkpoint.every_steps=5"]


def _mlflow_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--default-artifact-root", str(tmp / "artifacts")],
                            stdout=open(tmp / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"the MLflow server did not start:\n{(tmp / 'mlflow.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    import os

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _jsonl_losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _sigterm_then_finish(run: Path, args: list[str], logs: Path, **env: str) -> None:
    (proc,) = cli_runs.start(args, logs, **env)
    cli_runs.wait_for_step(run, 10, [proc])
    proc.send_signal(signal.SIGTERM)
    assert cli_runs.wait([proc]) == [exit_codes.REQUEUE], cli_runs.logs(logs)
    (proc,) = cli_runs.start(args, logs, **env)  # the requeued job
    assert cli_runs.wait([proc]) == [0], cli_runs.logs(logs)


def test_mlflow_against_a_real_server(tmp_path: Path, digits: str) -> None:
    from mlflow.tracking import MlflowClient

    server, url = _mlflow_server(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        run = tmp_path / "run"
        args = [*TRACKED, f"data.train_manifest={digits}", f"train.run_dir={run}", "train.num_steps=100",
                "log.trackers=[mlflow]", f"log.mlflow_uri={url}", "log.mlflow_experiment=ci"]
        _sigterm_then_finish(run, args, logs)
        ids = json.loads((run / "trackers.json").read_text())
        client = MlflowClient(url)
        (exp,) = [e for e in client.search_experiments() if e.name == "ci"]
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # the rerun continued the same MLflow run
        r = runs[0]
        assert r.info.status == "FINISHED" and r.data.params["method.name"] == "barlow_twins"
        assert r.data.params["train.num_steps"] == "100"
        got = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss")}
        want = _jsonl_losses(run)
        assert sorted(got) == sorted(want) and max(want) == 100
        assert all(abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want)

        assert main(["hub", "push", str(run), "--hub", str(tmp_path / "hub"), "--name", "bt", "--version", "v1"]) == 0
        assert client.get_run(r.info.run_id).data.tags["largessl.hub"] == "bt@v1"

        # an outage mid-run: the server dies, training goes on and ends normally
        run2 = tmp_path / "run2"
        (proc,) = cli_runs.start([*TRACKED, f"data.train_manifest={digits}", f"train.run_dir={run2}",
                                  "train.num_steps=300", "log.trackers=[mlflow]", f"log.mlflow_uri={url}"], logs)
        cli_runs.wait_for_step(run2, 10, [proc])
        _stop(server)
        assert cli_runs.wait([proc]) == [0], cli_runs.logs(logs)
        text = "\n".join(p.read_text() for p in sorted(logs.glob("*.log")))
        assert "mlflow: cannot log" in text and "could not be logged and were dropped" in text
        assert max(_jsonl_losses(run2)) == 300  # metrics.jsonl has every record
    finally:
        _stop(server)


def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``): a ':W&B' header, then LevelDB-log chunks
    (crc32, length, type) in 32 KiB blocks, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, chunks, out = 7, 32768, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
            chunks = []
    return out


def test_wandb_offline_files_read_back(tmp_path: Path, digits: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    run = tmp_path / "run"
    args = [*TRACKED, f"data.train_manifest={digits}", f"train.run_dir={run}", "train.num_steps=100",
            "log.trackers=[tensorboard,wandb]"]
    _sigterm_then_finish(run, args, logs, WANDB_MODE="offline", WANDB_SILENT="true")
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    logs_dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(logs_dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in logs_dirs)  # the same W&B run twice
    history, config = {}, {}
    for d in logs_dirs:
        for rec in _wandb_records(d / f"run-{run_id}.wandb"):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                if "loss" in items:
                    history[int(items["_step"])] = items["loss"]
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    want = _jsonl_losses(run)
    assert sorted(history) == sorted(want) and max(want) == 100
    assert all(abs(history[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want)
    assert config["method.name"] == "barlow_twins" and config["train.num_steps"] == 100
    shutil.rmtree(run / "wandb")
