"""Names of the files in a run directory: the contract between the trainer, the evaluation stages and the hub.

::

    <run_dir>/config.yaml        the resolved config (rank 0), written once the restart is accepted
    <run_dir>/config_history.jsonl  every accepted change of the config on a restart (largessl.run.restart)
    <run_dir>/metrics.jsonl      one record per logged step (and one ``event`` record per accepted change)
    <run_dir>/run.lock           the lease of the process that owns the run (largessl.run.lock)
    <run_dir>/pretrain-complete.json  written when pretraining reached its last step (stage jobs wait on it)
    <run_dir>/state.json         how the last process is doing or how it ended (largessl.run.state)
    <run_dir>/checkpoints/       step-N/ folders (largessl.run.checkpoint)
    <run_dir>/eval/knn.json      results of the evaluation stages, read by the hub's model card
    <run_dir>/eval/linear.json
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
COMPLETE_FILE = "pretrain-complete.json"
STATE_FILE = "state.json"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
LINEAR_JSON = "linear.json"
KNN_JSON = "knn.json"


def run_dir_of(path: str | os.PathLike[str], saved_path: str = "") -> Path | None:
    """The local run directory of a checkpoint argument: ``path`` itself when it is a run directory, else the
    grandparent of the checkpoint folder it resolved to (``saved_path``: ``<run_dir>/checkpoints/step-N``)."""
    if "://" in str(path):
        return None
    for cand in (Path(str(path)), Path(str(saved_path)).parent.parent):
        if (cand / METRICS_FILE).is_file() or (cand / CONFIG_FILE).is_file():
            return cand
    return None
