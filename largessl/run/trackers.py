"""External experiment trackers, MLflow and Weights & Biases, as rank 0's metric sinks (``log.trackers``).

Each tracker gets what TensorBoard gets: every number of a metrics record at its step, plus the resolved config
as parameters (dotted keys). Its run id is kept in ``<run_dir>/trackers.json``, so a requeued or resumed run goes
on logging into the same tracker run instead of opening a new one; ``largessl hub push`` tags that run with the
published ``NAME@VERSION``.

A tracker outage must never stop or slow training. Records go into a bounded queue that a daemon thread sends;
a failed send is warned once and retried with backoff (1 s doubling to 60 s) while training goes on; when the queue
is full the oldest record is dropped and counted; :meth:`TrackerSink.close` waits at most ``close_timeout_s`` for
the rest and logs how many records were dropped. Credentials come from the environment only (MLflow's
``MLFLOW_TRACKING_*``, W&B's ``WANDB_API_KEY``; ``WANDB_MODE=offline`` writes the run under the run directory).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record other than its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_ids(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Tracker run ids recorded in the run directory ({} when none)."""
    try:
        data = json.loads((Path(run_dir) / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_id(run_dir: str | os.PathLike[str], tracker: str, run_id: str) -> None:
    """Record ``tracker``'s run id (temp file + rename)."""
    path = Path(run_dir) / IDS_FILE
    ids = read_ids(run_dir)
    ids[tracker] = run_id
    tmp = path.with_name(f".{IDS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class TrackerSink:
    """A metric sink that never blocks training: a bounded queue drained by a daemon thread with retries."""

    name = "tracker"

    def __init__(self, max_queue: int = 10000, close_timeout_s: float = 30.0, backoff_s: float = 1.0) -> None:
        self._backoff_s = backoff_s
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queue = max_queue
        self._close_timeout_s = close_timeout_s
        self._cv = threading.Condition()
        self._closing = False
        self.dropped = 0
        self.sent = 0
        self._failing = False
        self._thread = threading.Thread(target=self._drain, name=f"largessl-{self.name}", daemon=True)
        self._thread.start()

    # subclasses: one record out, and the end of the run
    def _send(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Tell the tracker the run's process ended."""

    def write(self, record: dict[str, Any]) -> None:
        """Queue a record (never blocks; the oldest record is dropped and counted when the queue is full)."""
        with self._cv:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(record)
            self._cv.notify()

    def _drain(self) -> None:
        backoff = self._backoff_s
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                record = self._queue[0]
            try:
                self._send(record)
            except Exception as e:  # any client error: the tracker is down or refuses; training goes on
                if not self._failing:
                    log.warning("%s: cannot log (%s: %s); training goes on, records are kept and retried",
                                self.name, type(e).__name__, e)
                    self._failing = True
                with self._cv:
                    if self._closing:
                        return
                    self._cv.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            if self._failing:
                log.warning("%s: logging again after an outage", self.name)
                self._failing, backoff = False, self._backoff_s
            with self._cv:
                if self._queue and self._queue[0] is record:
                    self._queue.popleft()
                self.sent += 1
                self._cv.notify_all()

    def close(self) -> None:
        """Send what is queued (at most ``close_timeout_s``, 5 s while the tracker is failing), end the tracker
        run, report drops."""
        start = time.monotonic()
        deadline = start + self._close_timeout_s
        with self._cv:
            while self._queue and time.monotonic() < deadline:
                if self._failing and time.monotonic() - start > 5.0:
                    break
                self._cv.wait(0.05)
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=2.0)
        with self._cv:
            self.dropped += len(self._queue)
            self._queue.clear()  # a sender still in a slow call stops after it
        if self.dropped:
            log.warning("%s: %d metric record(s) could not be logged and were dropped (metrics.jsonl has them all)",
                        self.name, self.dropped)
        if self._failing:
            return  # ending the run would only wait on the same outage
        try:
            self._finish()
        except Exception as e:
            log.warning("%s: could not end the tracker run: %s", self.name, e)


class MLflowSink(TrackerSink):
    """MLflow: one experiment (``log.mlflow_experiment``), one MLflow run per largessl run."""

    name = "mlflow"

    def __init__(self, run_dir: str | os.PathLike[str], config: dict[str, Any], tracking_uri: str = "",
                 experiment: str = "largessl", **kw: Any) -> None:
        # a down server must fail fast in the sender thread, not hold it in the client's own long retry loop
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri or None)
        run_id = read_ids(run_dir).get(self.name)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=Path(run_dir).name,
                                            tags={"largessl.run_dir": str(Path(run_dir).resolve())}).info.run_id
            write_id(run_dir, self.name, run_id)
            write_id(run_dir, "mlflow_uri", self.client.tracking_uri)
            params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(config).items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[i:i + 100])
            log.info("mlflow: run %s in experiment %r at %s", run_id, experiment, self.client.tracking_uri)
        else:
            self.client.update_run(run_id, status="RUNNING")
            log.info("mlflow: continuing run %s", run_id)
        self.run_id = run_id
        super().__init__(**kw)

    def _send(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(record["step"])
        metrics = [Metric(k, v, ts, step) for k, v in numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class WandbSink(TrackerSink):
    """Weights & Biases: one W&B run per largessl run (``log.wandb_project``), files under the run directory."""

    name = "wandb"

    def __init__(self, run_dir: str | os.PathLike[str], config: dict[str, Any], project: str = "largessl",
                 entity: str = "", **kw: Any) -> None:
        import wandb

        run_id = read_ids(run_dir).get(self.name)
        fresh = run_id is None
        if fresh:
            run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
            write_id(run_dir, self.name, run_id)
        self.run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                              dir=str(run_dir), name=Path(run_dir).name, config=flatten(config),
                              settings=wandb.Settings(console="off", quiet=True))
        log.info("wandb: %s run %s (%s)", "new" if fresh else "continuing", run_id, self.run.settings.mode)
        super().__init__(**kw)

    def _send(self, record: dict[str, Any]) -> None:
        self.run.log(numbers(record), step=int(record["step"]))

    def _finish(self) -> None:
        self.run.finish()


def build_trackers(names: list[str], run_dir: str | os.PathLike[str], config: dict[str, Any],
                   log_cfg: Any) -> list[TrackerSink]:
    """The MLflow / W&B sinks named in ``log.trackers`` (TensorBoard is the trainer's own sink). A tracker that
    cannot start (server down, package missing) is a warning: training never waits for a tracker."""
    sinks: list[TrackerSink] = []
    for name in names:
        try:
            if name == "mlflow":
                sinks.append(MLflowSink(run_dir, config, log_cfg.mlflow_uri, log_cfg.mlflow_experiment))
            elif name == "wandb":
                sinks.append(WandbSink(run_dir, config, log_cfg.wandb_project, log_cfg.wandb_entity))
        except ImportError as e:
            log.warning("log.trackers names %s but it is not installed (%s): pip install 'largessl[trackers]'; "
                        "training goes on without it", name, e)
        except Exception as e:
            log.warning("%s: cannot start (%s: %s); training goes on without it", name, type(e).__name__, e)
    return sinks


def tag_hub_version(run_dir: str | os.PathLike[str], ref: str, hub_url: str) -> None:
    """Attach a published hub version to the run's MLflow run (W&B runs are closed; their ids are in the card)."""
    ids = read_ids(run_dir)
    if "mlflow" in ids:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=ids.get("mlflow_uri") or None)
            client.set_tag(ids["mlflow"], "largessl.hub", ref)
            client.set_tag(ids["mlflow"], "largessl.hub_url", hub_url)
        except Exception as e:  # the hub push itself succeeded
            log.warning("could not tag MLflow run %s with %s: %s", ids["mlflow"], ref, e)
