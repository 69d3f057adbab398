"""Submit-time checks through the real commands: every case the issue found is refused with exit 2 and a message
naming the problem before anything is queued (``launch slurm --dry-run``, ``launch k8s``, ``config --check``), and a
missing manifest is exit 2 at run time too. The data is the digits shards (real manifests on local disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from largessl.cli import main
from largessl.run import exit_codes

ROOT = Path(__file__).resolve().parents[2]
BT = str(ROOT / "configs" / "barlow_twins_r50_in1k.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from largessl.data.digits import write_digits_shards

    return write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=16)


@pytest.fixture
def run(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    """``largessl ARGV`` in this process: (exit code, what it printed and logged)."""

    def _run(*argv: str) -> tuple[int, str]:
        caplog.clear()
        code = main(list(argv))
        out, err = capfd.readouterr()
        return code, out + err + caplog.text

    return _run


def _slurm(tmp_path: Path, *extra: str) -> list[str]:
    return ["launch", "slurm", "--config", BT, "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
            f"train.run_dir={tmp_path / 'run'}", *extra]


def test_batch_not_divisible_by_the_job_is_refused_at_submit(tmp_path, digits, run) -> None:
    train, val = digits
    code, text = run(*_slurm(tmp_path, "train.global_batch_size=2050", f"data.train_manifest={train}",
                                     f"data.val_manifest={val}"))
    assert code == exit_codes.BAD_INPUT, text
    assert "train.global_batch_size=2050 is not divisible by the job's 16 processes" in text
    assert "#SBATCH" not in text  # nothing rendered, nothing submitted
    code, text = run("config", "--check", "--config", BT, "--nodes", "2", "--gpus-per-node", "8",
                      "train.global_batch_size=2050", f"train.run_dir={tmp_path / 'run'}",
                      f"data.train_manifest={train}", f"data.val_manifest={val}")
    assert code == exit_codes.BAD_INPUT and "not divisible by the job's 16 processes" in text, text


def test_the_readme_commands_without_a_manifest_are_refused(tmp_path, run) -> None:
    # README "Run on SLURM" and "Run on Kubernetes", as written before this check existed
    code, text = run("launch", "slurm", "--config", BT, "--nodes", "4", "--gpus-per-node", "8",
                      "--cpus-per-task", "10", "--partition", "gpu", "--account", "myproj", "--time", "24:00:00",
                      f"train.run_dir={tmp_path / 'bt-r50'}", "stages=[linear,knn]", "--dry-run")
    assert code == exit_codes.BAD_INPUT and "data.train_manifest is empty" in text, text
    assert "data.val_manifest is empty" in text  # every problem is listed at once
    code, text = run("launch", "k8s", "--config", BT, "--nodes", "4", "--gpus-per-node", "8", "--image",
                      "registry/largessl:0.1.0", "--pvc", "largessl-runs", "--namespace", "ssl",
                      "--out", str(tmp_path / "k8s"))
    assert code == exit_codes.BAD_INPUT and "data.train_manifest is empty" in text, text
    assert not (tmp_path / "k8s").exists()


def test_stages_without_a_val_manifest_are_refused(tmp_path, digits, run) -> None:
    train, _ = digits
    code, text = run(*_slurm(tmp_path, f"data.train_manifest={train}", "stages=[knn,linear]"))
    assert code == exit_codes.BAD_INPUT, text
    assert "stages ['knn', 'linear'] evaluate on a labelled val set but data.val_manifest is empty" in text


def test_a_wrong_manifest_path_is_bad_input_at_submit_and_at_run_time(tmp_path, digits, run) -> None:
    missing = tmp_path / "nowhere" / "manifest.json"
    code, text = run(*_slurm(tmp_path, f"data.train_manifest={missing}", "stages=[]"))
    assert code == exit_codes.BAD_INPUT and f"manifest {missing} does not exist" in text, text
    code, text = run("config", "--check", f"data.train_manifest={missing}", f"train.run_dir={tmp_path}/r")
    assert code == exit_codes.BAD_INPUT and "does not exist" in text, text
    # at run time: 2 as well (the policies retry 3; a path that is not there never appears)
    code, text = run("pretrain", f"data.train_manifest={missing}", f"train.run_dir={tmp_path / 'r2'}",
                      "train.device=cpu")
    assert code == exit_codes.BAD_INPUT and "does not exist" in text.splitlines()[-1], text
    assert not (tmp_path / "r2").exists()  # refused before the run directory was made


def test_unwritable_checkpoint_storage_is_refused(tmp_path, digits, run) -> None:
    train, val = digits
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, text = run("config", "--check", f"data.train_manifest={train}", f"data.val_manifest={val}",
                      "train.global_batch_size=16", f"train.run_dir={tmp_path / 'run'}",
                      f"checkpoint.dir={blocker}/ckpt")
    assert code == exit_codes.BAD_INPUT and f"checkpoint.dir: cannot write to {blocker}/ckpt" in text, text


def test_a_sound_job_passes_and_lists_what_was_checked(tmp_path, digits, run) -> None:
    train, val = digits
    code, text = run("config", "--check", "--nodes", "2", "--tasks-per-node", "2",
                      f"data.train_manifest={train}", f"data.val_manifest={val}", "train.global_batch_size=16",
                      "stages=[knn]", f"train.run_dir={tmp_path / 'run'}")
    assert code == 0, text
    for line in ("ok: global batch 16 = 4 processes x 4", "ok: data.train_manifest", "every shard present",
                 "ok: stages ['knn']", "ok: train.run_dir", "is writable", "config OK for 2 node(s) x 2"):
        assert line in text
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # the probes are removed


def test_kubernetes_checks(tmp_path, digits, run) -> None:
    train, val = digits
    base = ["launch", "k8s", "--nodes", "3", "--gpus-per-node", "8", "--pvc", "runs", "--out", str(tmp_path / "o"),
            f"data.train_manifest={train}", f"data.val_manifest={val}", "train.run_dir=bt"]
    code, text = run(*base, "--image", "registry/largessl:0.1.0", "train.global_batch_size=2048")
    assert code == exit_codes.BAD_INPUT and "not divisible by the job's 24 processes" in text, text
    code, text = run(*base, "--image", "registry/largessl: 0.1", "train.global_batch_size=2040")
    assert code == exit_codes.BAD_INPUT and "is not an image reference" in text, text
    code, text = run(*base, "--image", "registry/largessl:0.1.0", "train.global_batch_size=2040",
                      "--cpu", "lots")
    assert code == exit_codes.BAD_INPUT and "--cpu 'lots' is not a Kubernetes quantity" in text, text
    code, text = run(*[a for a in base if a not in ("--pvc", "runs")], "--image", "registry/largessl:0.1.0",
                      "train.global_batch_size=2040")
    assert code == exit_codes.BAD_INPUT and "--pvc" in text, text  # no volume and no object storage: no resume
