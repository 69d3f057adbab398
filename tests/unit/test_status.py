"""``largessl status`` on run directories built by hand: the states, the metrics tail read from the end of the
file, the run finder, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from largessl.cli import main
from largessl.run.state import start_record, write_state
from largessl.run.status import find_runs, run_status, tail_records


def _run_dir(root: Path, name: str, records: list[dict], **state) -> Path:
    run = root / name
    (run / "checkpoints" / "step-00000020").mkdir(parents=True)
    (run / "checkpoints" / "step-00000020" / "COMPLETE.json").write_text("{}")
    (run / "checkpoints" / "step-00000030").mkdir()  # no COMPLETE.json: an interrupted save does not count
    (run / "config.yaml").write_text("method: {name: vicreg}\nmodel: {arch: resnet50}\ntrain: {global_batch_size: 64}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if state:
        write_state(run, **{**start_record(0, 100, 64), **state})
    return run


RECORDS = [{"step": 10, "epoch": 0.5, "loss": 9.0, "images_per_s": 640.0, "data_wait_frac": 0.25,
            "skipped_samples": 1, "collapse/std": 0.9, "collapse/rankme": 50.0},
           {"step": 20, "epoch": 1.0, "loss": 7.5, "images_per_s": 320.0, "data_wait_frac": 0.05, "skipped_samples": 2},
           {"event": "config_change", "step": 20}]


def test_states_from_the_state_file_and_the_lock(tmp_path: Path) -> None:
    finished = _run_dir(tmp_path, "a", RECORDS, state="finished", exit_code=0, step=100)
    failed = _run_dir(tmp_path, "b", RECORDS, state="failed", exit_code=4, reason="training diverged: loss is nan")
    requeued = _run_dir(tmp_path, "c", RECORDS, state="requeued", exit_code=75)
    died = _run_dir(tmp_path, "d", RECORDS, state="running")  # no lock: the process is gone
    s = {p.name: run_status(p) for p in (finished, failed, requeued, died)}
    assert [s[k]["state"] for k in "abcd"] == ["finished", "failed", "requeued", "died"]
    b = s["b"]
    assert (b["exit_code"], b["reason"], b["method"], b["arch"]) == (4, "training diverged: loss is nan", "vicreg",
                                                                      "resnet50")
    assert (b["step"], b["num_steps"], b["loss"], b["images_per_s"], b["skipped_samples"]) == (20, 100, 7.5, 320.0, 2)
    assert b["collapse"] == {"std": 0.9, "rankme": 50.0} and b["collapse_step"] == 10
    assert b["checkpoint"]["step"] == 20 and b["checkpoint"]["age_s"] >= 0
    assert b["eta_s"] is None  # only a running run has an ETA


def test_a_live_lock_is_running_with_an_eta(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "r", RECORDS, state="running")
    from largessl.run.lock import RunLock

    lock = RunLock(run)
    lock.acquire()
    try:
        s = run_status(run)
    finally:
        lock.release()
    assert s["state"] == "running" and s["lock"] == "running"
    assert s["eta_s"] == pytest.approx((100 - 20) * 64 / 320.0)


def test_the_table_and_json_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run_dir(tmp_path / "sweep", "m0", RECORDS, state="failed", exit_code=3, reason="storage error (OSError): x")
    _run_dir(tmp_path / "sweep", "m1", RECORDS, state="finished", exit_code=0)
    assert main(["status", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["run", "state", "step", "epoch", "loss"]
    assert "failed (3)" in out[1] and "20/100" in out[1] and "step 20," in out[1] and "std 0.9" in out[1]
    assert "finished" in out[2]
    assert out[3].endswith("storage error (OSError): x")
    assert main(["status", "--json", str(tmp_path / "sweep" / "m1")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["state"] == "finished" and row["loss"] == 7.5


def test_status_reads_a_copy_of_a_run(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "orig", RECORDS, state="finished", exit_code=0)
    copy = tmp_path / "copied"
    shutil.copytree(run, copy)
    assert run_status(copy)["state"] == "finished"


def test_the_tail_is_read_from_the_end_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"step": 0, "loss": 1.0, "collapse/std": 0.1}) + "\n")
        for i in range(1, 20000):  # about 1 MB; every line ~50 bytes, so lines straddle the 64 KiB chunks
            f.write(json.dumps({"step": i, "loss": float(i), "pad": "x" * (i % 17)}) + "\n")
        f.write('{"step": 20000, "lo')  # a line being written right now
    got = tail_records(path)
    assert got["loss"]["step"] == 19999  # the newest complete record
    assert got["collapse/"]["step"] == 0  # found at the very start of the file
    assert tail_records(path, max_bytes=100_000).keys() == {"loss"}  # bounded: not the whole file


def test_find_runs_stops_at_run_directories(tmp_path: Path) -> None:
    a = _run_dir(tmp_path / "x", "a", RECORDS, state="finished")
    nested = a / "eval" / "inner"
    nested.mkdir(parents=True)
    (nested / "config.yaml").write_text("{}")
    (nested / "metrics.jsonl").write_text("")
    b = _run_dir(tmp_path / "y" / "z", "b", RECORDS)
    assert find_runs(tmp_path) == [a, b]


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        run_status(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a run directory"):
        run_status(tmp_path)
    with pytest.raises(ValueError, match="no run directories below"):
        main_args = ["status", "--root", str(tmp_path)]
        import argparse

        from largessl.run.cli import add_arguments, run

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        run(parser.parse_args(main_args[1:]))
    for args in (["status", str(tmp_path / "missing")], ["status", str(tmp_path)], ["status", "--root", str(tmp_path)],
                 ["status"]):
        assert main(args) == 2, args  # bad input: exit 2
