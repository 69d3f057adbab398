"""launchers/*.sh call the launch commands correctly (SLURM dry run, Kubernetes render-only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from largessl.launch import k8s


def _script(repo_root: Path, name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", str(repo_root / "launchers" / name)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PATH": path, **env})


def test_slurm_launcher_dry_run(repo_root: Path, tmp_path: Path) -> None:
    res = _script(repo_root, "slurm_imagenet.sh", tmp_path, DRY_RUN="1", NODES="2", PARTITION="gpu", OFFLINE="1")
    assert res.returncode == 0, res.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in res.stdout
    assert "# then (afterok):" in res.stdout and f"run directory: {tmp_path}/runs/imagenet-bt-r50" in res.stdout


def test_k8s_launcher_render_only(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _script(repo_root, "k8s_imagenet.sh", tmp_path, RENDER_ONLY="1", IMAGE="reg.example/largessl:1",
                  OUT=str(out), NODES="2", OFFLINE="1")
    assert res.returncode == 0, res.stderr
    manifests = [m for f in ("pretrain.yaml", "stages.yaml") for m in yaml.safe_load_all((out / f).read_text())]
    k8s.validate_manifests(manifests, "1.33.0")
    job = next(m for m in manifests if m["kind"] == "Job" and m["spec"].get("completionMode") == "Indexed")
    assert job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/largessl:1"
