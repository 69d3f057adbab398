"""The layer rules (tools/check_layers.py, drawn in docs/architecture.md) hold on the tree, and they bite."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
sys.modules["check_layers"] = check_layers  # dataclasses look their module up there
_spec.loader.exec_module(check_layers)


def test_the_tree_keeps_its_layers():
    problems = check_layers.check(ROOT)
    assert problems == [], "\n".join(problems)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "largessl", tmp_path / "largessl", ignore=shutil.ignore_patterns("__pycache__"))
    assert check_layers.check(tmp_path) == []
    return tmp_path


def _plant(tree: Path, rel: str, line: str) -> None:
    path = tree / rel
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


@pytest.mark.parametrize("rel, line, expect", [
    # a lazy import inside a function counts like a top-level one
    ("largessl/data/batch.py", "from largessl.train.trainer import build_trainer",
     "largessl.data.batch imports largessl.train.trainer: an upward import"),
    ("largessl/run/checkpoint.py", "from largessl.train import optim",
     "largessl.run.checkpoint imports largessl.train.optim: an upward import"),
    ("largessl/train/step.py", "import largessl.eval.knn",
     "largessl.train and largessl.eval stand side by side"),
    ("largessl/eval/linear.py", "from largessl.train.schedules import apply_lr",
     "largessl.eval and largessl.train stand side by side"),
    ("largessl/launch/k8s.py", "from largessl.data.manifest import read_manifest",
     "never imports the training internals"),
])
def test_a_planted_import_is_refused(tree, rel, line, expect):
    _plant(tree, rel, line)
    problems = check_layers.check(tree)
    assert any(expect in p and f"{rel}:" in p for p in problems), problems


def test_a_planted_cycle_is_refused(tree):
    # both imports point down or sideways within one package, so only the cycle rule can catch them
    _plant(tree, "largessl/eval/knn.py", "from largessl.eval import linear")
    _plant(tree, "largessl/eval/linear.py", "from largessl.eval import knn")
    problems = check_layers.check(tree)
    assert any(p.startswith("import cycle:") and "largessl.eval.knn" in p and "largessl.eval.linear" in p
               for p in problems), problems


def test_a_module_on_no_floor_is_an_error(tree):
    (tree / "largessl" / "newthing").mkdir()
    (tree / "largessl" / "newthing" / "__init__.py").write_text("")
    with pytest.raises(ValueError, match="largessl.newthing stands on no floor"):
        check_layers.check(tree)


def test_the_command_line_exits_1_on_a_violation(tree):
    ok = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py"), str(tree)], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "layers: ok" in ok.stdout, ok.stdout + ok.stderr
    _plant(tree, "largessl/nn/batchnorm.py", "from largessl.methods import build_method")
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py"), str(tree)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "largessl.nn.batchnorm imports largessl.methods" in bad.stdout, bad.stdout


def test_no_dist_package_and_no_shim():
    # `dist/` reads as a build-output folder to tooling; the package is `largessl.distributed`, with nothing left
    # behind under the old name
    assert not (ROOT / "largessl" / "dist").exists()
    stale = []
    old = "largessl" + "{}dist"  # spelled apart so this file does not match itself
    needles = (old.format(".") + ".", old.format("/") + "/", f"from {old.format('.')} import",
               f"import {old.format('.')}\n")
    for path in [*ROOT.glob("largessl/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("tools/*.py"),
                 *ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]:
        text = path.read_text()
        for needle in needles:
            if needle in text:
                stale.append(f"{path.relative_to(ROOT)}: {needle!r}")
    assert not stale, stale
