"""Sweeps without a cluster: the grid, the members, the sweep record, the SLURM array script, the Kubernetes
Indexed Job (strict schemas), the member wrapper and the status table and plot. On real SLURM:
tests/integration/test_sweep_slurm.py; real local runs: tests/integration/test_sweep_local.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from largessl.cli import main
from largessl.launch import k8s
from largessl.launch import sweep as sw
from largessl.launch.sweep_report import format_report, grid_points, plot

K8S_VERSIONS = ("1.30.0", "1.33.0")


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text("train: {num_steps: 10}\nstages: [knn]\n"
                 "data: {train_manifest: s3://b/train/manifest.json, val_manifest: s3://b/val/manifest.json}\n")
    return p


def test_values_split_on_top_level_commas_only() -> None:
    assert sw.split_values("1e-3,5e-3, 1e-2") == ["1e-3", "5e-3", "1e-2"]
    assert sw.split_values("[64,64],[128,128]") == ["[64,64]", "[128,128]"]
    assert sw.split_values("'a,b',c") == ["'a,b'", "c"]


@pytest.mark.parametrize("grid, message", [
    (["method.lambd"], "must look like"),
    (["method.lambd=1e-3,,5e-3"], "empty value"),
    (["method.lambd=1,1"], "names a value twice"),
    (["method.lambd=1,2", "method.lambd=3"], "given twice"),
    (["train.run_dir=a,b"], "own run directory"),
    ([], "at least one --grid"),
])
def test_bad_grids_are_refused(grid: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sw.parse_grid(grid)


def test_members_are_every_combination_then_seeds(cfg_file: Path, tmp_path: Path) -> None:
    s = sw.plan_sweep(str(tmp_path / "sw"), [str(cfg_file)], ["optim.warmup_epochs=3"],
                      ["method.lambd=1e-3,5e-3", "optim.base_lr=0.1,0.2"], seeds=3)
    assert len(s.members) == 12 and [m.index for m in s.members] == list(range(12))
    # the seed varies fastest, then the last --grid axis
    assert [m.values for m in s.members[:4]] == [
        {"method.lambd": "1e-3", "optim.base_lr": "0.1", "train.seed": str(i)} for i in range(3)] + [
        {"method.lambd": "1e-3", "optim.base_lr": "0.2", "train.seed": "0"}]
    assert s.members[0].name == "000-lambd=1e-3-base_lr=0.1-seed=0"
    assert s.members[11].overrides == ["method.lambd=5e-3", "optim.base_lr=0.2", "train.seed=2",
                                       f"train.run_dir={tmp_path / 'sw'}/{s.members[11].name}"]
    assert len({m.run_dir for m in s.members}) == 12


def test_same_last_key_names_use_the_full_key(cfg_file: Path, tmp_path: Path) -> None:
    s = sw.plan_sweep(str(tmp_path), [str(cfg_file)], [], ["train.seed=0,1", "eval.seed=0"])
    assert s.members[1].name == "001-train.seed=1-eval.seed=0"


@pytest.mark.parametrize("overrides, grid, seeds, message", [
    ([], ["method.nope=1,2"], 1, "sweep member 000-nope=1: .*method.nope"),
    ([], ["optim.base_lr=0.1,abc"], 1, "sweep member 001-base_lr=abc"),
    (["train.run_dir=x"], ["optim.base_lr=0.1"], 1, "each member's run directory"),
    (["optim.base_lr=0.3"], ["optim.base_lr=0.1"], 1, "both an override and a --grid axis"),
    (["train.seed=4"], ["optim.base_lr=0.1"], 2, "both set the seed"),
    ([], ["train.seed=1,2"], 2, "both set the seed"),
])
def test_bad_members_fail_before_anything_is_written(cfg_file: Path, tmp_path: Path, overrides: list[str],
                                                     grid: list[str], seeds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sw.plan_sweep(str(tmp_path / "sw"), [str(cfg_file)], overrides, grid, seeds)
    assert not (tmp_path / "sw").exists()


def test_the_same_sweep_resumes_and_another_is_refused(cfg_file: Path, tmp_path: Path) -> None:
    d = str(tmp_path / "sw")
    first = sw.record(sw.plan_sweep(d, [str(cfg_file)], [], ["optim.base_lr=0.1,0.2"]))
    again = sw.record(sw.plan_sweep(d, [str(cfg_file)], [], ["optim.base_lr=0.1,0.2"]))
    assert again.created_at == first.created_at
    loaded = sw.load_sweep(d)
    assert loaded.same_request(first) and loaded.members[1].values == {"optim.base_lr": "0.2"}
    with pytest.raises(ValueError, match="already holds another sweep"):
        sw.record(sw.plan_sweep(d, [str(cfg_file)], [], ["optim.base_lr=0.1,0.3"]))
    assert sw.load_sweep(d).same_request(first)  # the refused one wrote nothing
    with pytest.raises(ValueError, match="not a sweep directory"):
        sw.load_sweep(tmp_path)
    (tmp_path / "sw" / sw.SWEEP_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        sw.load_sweep(d)


def test_slurm_dry_run_is_one_array(cfg_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "sw"
    code = main(["sweep", "slurm", "--config", str(cfg_file), "--grid", "method.lambd=1e-3,5e-3",
                 "--grid", "optim.base_lr=0.1,0.2", "--dir", str(d), "--parallel", "3", "--gpus-per-node", "8",
                 "--time", "2:00:00", "--offline", "--dry-run", "optim.warmup_epochs=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    script, tasks = out.split("\n# task 0:")
    for line in ("--array=0-3%3", "--requeue", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=120",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script
    assert f"--output={d}/slurm/%A_%a/%A_%a_0_log.out" in script
    lines = ("# task 0:" + tasks).strip().splitlines()
    assert len(lines) == 4
    assert lines[3].endswith(f"optim.warmup_epochs=2 method.lambd=5e-3 optim.base_lr=0.2 train.run_dir={d}/"
                             "003-lambd=5e-3-base_lr=0.2")
    assert "stages=[]" not in out  # each member runs its stages in its own job
    assert not (d / sw.SWEEP_FILE).exists()  # a dry run records nothing


def _k8s(cfg_file: Path, tmp_path: Path, **kw) -> tuple[sw.Sweep, list[dict]]:
    # the sweep's directory is relative: on the cluster it lies on the runs volume (sweep.json goes here)
    s = sw.plan_sweep("sweeps/lr", [str(cfg_file)], [], ["optim.base_lr=0.1,0.2,0.4"], seeds=2)
    req = k8s.K8sRequest(config=[str(cfg_file)], image="reg.example/largessl:0.1", pvc="runs", offline=True,
                         gpus_per_node=kw.pop("gpus", 8), **kw)
    return s, sw.plan_k8s(s, req, parallel=4)


def test_k8s_sweep_is_one_indexed_job(cfg_file: Path, tmp_path: Path) -> None:
    s, manifests = _k8s(cfg_file, tmp_path)
    for version in K8S_VERSIONS:
        k8s.validate_manifests(manifests, version)
    cm, job = manifests
    assert [cm["kind"], job["kind"]] == ["ConfigMap", "Job"]  # no rendezvous Service: members are one pod each
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 6 and spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 6 and "backoffLimit" not in spec
    actions = [r["action"] for r in spec["podFailurePolicy"]["rules"]]
    assert actions == ["Ignore", "Ignore", "FailIndex"]  # a collapsed member fails its index, not the sweep
    container = spec["template"]["spec"]["containers"][0]
    assert container["args"][:5] == ["sweep", "member", "--members", "/etc/largessl/members.json", "--"]
    assert container["args"][5:] == ["launch", "node", "--nproc-per-node", "8", "--", "pretrain", "--config",
                                     "/etc/largessl/config.yaml"]
    names = {e["name"] for e in container["env"]}
    assert sw.INDEX_ENV in names and "LARGESSL_WORLD_SIZE" not in names
    members = json.loads(cm["data"]["members.json"])
    assert members[5] == ["optim.base_lr=0.4", "train.seed=1",
                          f"train.run_dir=/mnt/runs/sweeps/lr/{s.members[5].name}"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["stages"] == ["knn"]  # the stages run in each member's pod after its pretraining
    with pytest.raises(ValueError, match="one pod"):
        _k8s(cfg_file, tmp_path, nodes=2)


def test_member_wrapper_appends_the_members_overrides(cfg_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    members = tmp_path / "members.json"
    members.write_text(json.dumps([["optim.base_lr=0.1"], ["optim.base_lr=0.7", "train.run_dir=/runs/m1"]]))
    env = {"JOB_COMPLETION_INDEX": "1"}
    assert sw.run_member(str(members), ["config", "--config", str(cfg_file)], environ=env) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["base_lr"] == 0.7 and resolved["train"]["run_dir"] == "/runs/m1"
    assert "JOB_COMPLETION_INDEX" not in env  # the index is the member's, not a node rank for `launch node`
    with pytest.raises(ValueError, match="outside the 2 member"):
        sw.run_member(str(members), ["config"], index=2, environ={})
    with pytest.raises(ValueError, match="no member index"):
        sw.run_member(str(members), ["config"], environ={})


def _rows(s: sw.Sweep, knn: dict[int, float], linear: dict[int, float]) -> list[dict]:
    return [{"index": m.index, "name": m.name, "values": m.values, "run_dir": m.run_dir,
             "state": "finished" if m.index in knn else "pending", "exit_code": None, "step": 10 if m.index in knn
             else 0, "num_steps": 10, "loss": 1.5, "slurm": None, "reason": "", "knn": knn.get(m.index),
             "linear": linear.get(m.index), "knn_k": 20} for m in s.members]


def test_status_table_means_over_seeds_and_plot(cfg_file: Path, tmp_path: Path) -> None:
    s = sw.plan_sweep(str(tmp_path / "sw"), [str(cfg_file)], [], ["optim.base_lr=0.1,1.0", "method.lambd=1,2"],
                      seeds=2)
    knn = {i: 50.0 + i for i in range(7)}  # member 7 has not finished
    rows = _rows(s, knn, {i: 60.0 + 2 * i for i in range(7)})
    pts = grid_points(s, rows)
    assert len(pts) == 4
    assert pts[0]["values"] == {"optim.base_lr": "0.1", "method.lambd": "1"}
    assert pts[0]["knn"] == (50.5, pytest.approx(0.5)) and pts[0]["knn_n"] == 2
    assert pts[3]["knn"] == (56.0, None) and pts[3]["knn_n"] == 1
    text = format_report(s, rows)
    assert "8 members, 7 finished" in text
    assert "0.1      1      50.5 ± 0.5 (n=2)  61.0 ± 1.0 (n=2)" in text
    assert "1.0      2      56.0 (n=1)" in text
    png = tmp_path / "p.png"
    assert plot(s, rows, png) == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a swept key"):
        plot(s, rows, png, x_key="train.seed")
    assert plot(s, _rows(s, {}, {}), tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
