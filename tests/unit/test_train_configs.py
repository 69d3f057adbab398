"""Every shipped config loads strictly and plans a run; the paper configs equal the tables of docs/methods.md;
the demo config file matches the embedded recipe; the weight-decay switch reaches the optimizer groups."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from largessl.config import _yaml_load, load_config, plan_run
from largessl.train.optim import build_optimizer, param_groups

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PAPER_CONFIGS = sorted((ROOT / "configs").glob("*_r50_in1k.yaml"))
METHODS_DOC = ROOT / "docs" / "methods.md"
IMAGENET_TRAIN = 1_281_167
IMPLEMENTATION_FIELDS = {"name", "collective", "whitening", "ns_iters", "seed"}
"""Method config fields that are engineering choices, not paper terms or recipe values (no table row needed)."""
RECIPE_KEYS = {"optim.name", "optim.base_lr", "optim.weight_decay", "optim.exclude_bias_norm_from_wd",
               "optim.warmup_epochs", "optim.final_lr_ratio", "train.global_batch_size", "train.epochs", "plan.lr",
               "data.augment", "model.sync_bn", "model.zero_init_residual"}
"""Recipe values every method's table must have a row for."""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_plans(path):
    cfg = load_config(path)
    plan = plan_run(cfg, world_size=8 if cfg.train.global_batch_size >= 256 else 1, num_train_samples=IMAGENET_TRAIN)
    assert plan.num_steps > 0 and plan.lr > 0


# --- docs/methods.md ⇄ configs/*_r50_in1k.yaml --------------------------------------------------------------


def _doc_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{config file name: rows} from the '## Method — `configs/NAME.yaml`' sections of docs/methods.md."""
    tables: dict[str, list[dict[str, str]]] = {}
    current = None
    header: list[str] = []
    for line in text.splitlines():
        heading = re.match(r"^## .*`configs/([\w.]+\.yaml)`", line)
        if heading:
            current, header = heading.group(1), []
            tables[current] = []
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            assert header == ["term / recipe value", "paper", "reference code", "largessl default", "config key"], header
        elif not set(line) <= set("|- "):
            assert len(cells) == len(header), f"{current}: a row with {len(cells)} cells: {line}"
            tables[current].append(dict(zip(header, cells)))
    return tables


def _resolved(cfg, key: str):
    section, name = key.split(".", 1)
    if section == "plan":
        return getattr(plan_run(cfg, 8, IMAGENET_TRAIN), name)
    return getattr(getattr(cfg, section), name)


def _documented(cell: str) -> object:
    m = re.search(r"`([^`]*)`", cell)
    assert m, f"the largessl default cell {cell!r} must give its value in backticks"
    return _yaml_load(m.group(1))


def _same(doc: object, value: object) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return doc == value
    if isinstance(value, (int, float)) and isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return math.isclose(float(doc), float(value), rel_tol=1e-9, abs_tol=0.0)
    return False


def test_every_paper_config_has_a_table_with_every_term():
    tables = _doc_tables(METHODS_DOC.read_text())
    assert set(tables) == {p.name for p in PAPER_CONFIGS}, "each configs/*_r50_in1k.yaml needs a table"
    for path in PAPER_CONFIGS:
        cfg = load_config(path)
        keys = {r["config key"].strip("`") for r in tables[path.name]}
        method_fields = {f"method.{f.name}" for f in dataclasses.fields(cfg.method)} - {
            f"method.{f}" for f in IMPLEMENTATION_FIELDS}
        if cfg.method.name == "multiview":  # the VICReg-style weights are described under the table
            method_fields -= {"method.sim_coeff", "method.std_coeff", "method.cov_coeff"}
        assert method_fields <= keys, f"{path.name}: no table row for {sorted(method_fields - keys)}"
        assert RECIPE_KEYS - {"model.arch"} <= keys, f"{path.name}: no table row for {sorted(RECIPE_KEYS - keys)}"
        assert path.read_text().lstrip().startswith("#") and "Source:" in path.read_text(), \
            f"{path.name} must name its source in its header comment"


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_paper_config_equals_the_documented_table(path):
    cfg = load_config(path)
    rows = _doc_tables(METHODS_DOC.read_text())[path.name]
    checked = 0
    for row in rows:
        key = row["config key"].strip("`")
        if key == "—":
            continue
        doc, value = _documented(row["largessl default"]), _resolved(cfg, key)
        assert _same(doc, value), (f"{path.name}: {key} resolves to {value!r} but docs/methods.md says {doc!r} "
                                   f"(row {row['term / recipe value']!r}); update the config or the table")
        checked += 1
    assert checked >= 20, f"{path.name}: only {checked} rows checked"


def test_the_doc_table_check_bites(tmp_path):
    """A config that drifts from the table fails the comparison above."""
    path = ROOT / "configs" / "vicreg_r50_in1k.yaml"
    drifted = tmp_path / "vicreg_r50_in1k.yaml"
    drifted.write_text(path.read_text().replace("final_lr_ratio: 0.001", "final_lr_ratio: 0.01")
                       .replace("base: eval_vicreg.yaml", f"base: {ROOT / 'configs' / 'eval_vicreg.yaml'}"))
    rows = {r["config key"].strip("`"): r for r in _doc_tables(METHODS_DOC.read_text())[path.name]}
    row = rows["optim.final_lr_ratio"]
    assert not _same(_documented(row["largessl default"]), _resolved(load_config(drifted), "optim.final_lr_ratio"))
    assert _same(_documented(row["largessl default"]), _resolved(load_config(path), "optim.final_lr_ratio"))


def test_paper_hyperparameters():
    bt = load_config(ROOT / "configs" / "barlow_twins_r50_in1k.yaml")
    plan = plan_run(bt, 8, IMAGENET_TRAIN)
    assert plan.lr == pytest.approx(0.2 * 2048 / 256) and plan.bias_norm_lr == pytest.approx(0.0048 * 8)
    assert bt.method.lambd == 0.005 and bt.optim.final_lr_ratio == 0.001 and bt.optim.weight_decay == 1.5e-6
    vic = load_config(ROOT / "configs" / "vicreg_r50_in1k.yaml")
    assert (vic.method.sim_coeff, vic.method.std_coeff, vic.method.cov_coeff) == (25.0, 25.0, 1.0)
    assert vic.optim.final_lr_ratio == 0.001 and vic.method.std_term == "paper"
    assert load_config(ROOT / "configs" / "simsiam_r50_in1k.yaml").optim.exclude_bias_norm_from_wd is False


# --- docs/eval.md ⇄ the evaluation recipe each paper config names ----------------------------------------------

EVAL_DOC = ROOT / "docs" / "eval.md"


def _eval_table(text: str) -> list[dict[str, str]]:
    """Rows of the linear-protocol table of docs/eval.md (the one whose header starts with 'recipe | pretraining')."""
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| recipe | pretraining configs |"):
            header = cells
        elif header and line.startswith("|"):
            if not set(line) <= set("|- "):
                rows.append(dict(zip(header, cells)))
        elif header:
            break
    assert rows, "docs/eval.md has no '| recipe | pretraining configs | ...' table"
    return rows


def _eval_values(row: dict[str, str]) -> dict[str, object]:
    return {k.strip("`"): _yaml_load(v.strip("`")) for k, v in row.items() if k.startswith("`eval.")}


def _check_eval(cfg, values: dict[str, object], where: str) -> None:
    for key, doc in values.items():
        value = getattr(cfg.eval, key.split(".", 1)[1])
        assert _same(doc, value), f"{where}: {key} resolves to {value!r} but docs/eval.md says {doc!r}"


def test_paper_recipes_name_their_eval_recipe_as_documented():
    """Each paper config names (as its base) the evaluation recipe docs/eval.md gives it, and resolves to its values;
    every evaluation file equals its row. So stages and `largessl eval` on a run use the paper's protocol."""
    named: dict[str, str] = {}
    for row in _eval_table(EVAL_DOC.read_text()):
        eval_file = ROOT / row["file"].strip("`")
        values = _eval_values(row)
        assert len(values) >= 5, row
        _check_eval(load_config(eval_file), values, eval_file.name)
        for name in re.findall(r"`([\w.]+\.yaml)`", row["pretraining configs"]):
            assert name not in named, f"{name} is in two rows of docs/eval.md"
            named[name] = eval_file.name
            path = ROOT / "configs" / name
            bases = _yaml_load(path.read_text()).get("base", [])
            bases = [bases] if isinstance(bases, str) else bases
            assert eval_file.name in [Path(b).name for b in bases], f"{name} must name {eval_file.name} as its base"
            _check_eval(load_config(path), values, name)
    assert set(named) == {p.name for p in PAPER_CONFIGS}, "every paper config needs its evaluation recipe row"


def test_the_eval_table_check_bites(tmp_path):
    """An evaluation file drifting from docs/eval.md fails the comparison above."""
    rows = {r["file"].strip("`"): r for r in _eval_table(EVAL_DOC.read_text())}
    drifted = tmp_path / "eval_barlow_twins.yaml"
    drifted.write_text((ROOT / "configs" / "eval_barlow_twins.yaml").read_text().replace("linear_lr: 0.3",
                                                                                        "linear_lr: 0.02"))
    with pytest.raises(AssertionError, match="linear_lr"):
        _check_eval(load_config(drifted), _eval_values(rows["configs/eval_barlow_twins.yaml"]), "drifted")


def test_a_stage_job_evaluates_with_the_recipe_of_the_run():
    """`largessl eval` (what SLURM and Kubernetes stage jobs run) starts from the run's saved config: the Barlow Twins
    run is probed with lr 0.3, not the default (VICReg's 0.02)."""
    from largessl.config import config_to_dict
    from largessl.eval.source import resolve_config

    saved = config_to_dict(load_config(ROOT / "configs" / "barlow_twins_r50_in1k.yaml"))
    assert resolve_config(saved, [], []).eval.linear_lr == 0.3
    assert load_config(None).eval.linear_lr == 0.02


# --- optim.exclude_bias_norm_from_wd ---------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_exclude_bias_norm_from_wd_switch(optimizer):
    base = load_config(None, [f"optim.name={optimizer}", "optim.weight_decay=0.01"]).optim
    net = _Net()
    for exclude in (True, False):
        cfg = dataclasses.replace(base, exclude_bias_norm_from_wd=exclude)
        groups = {g["name"]: g for g in param_groups(net, cfg, 0.1, 0.01)}
        assert {id(p) for p in groups["bias_norm"]["params"]} == {id(net.fc.bias), id(net.bn.weight), id(net.bn.bias)}
        assert groups["weights"]["weight_decay"] == 0.01
        assert groups["bias_norm"]["weight_decay"] == (0.0 if exclude else 0.01)
    # the decay really acts: with zero gradients, only decayed parameters move
    for exclude in (True, False):
        torch.manual_seed(0)
        net = _Net()
        with torch.no_grad():
            net.bn.weight.fill_(2.0)
        opt = build_optimizer(net, dataclasses.replace(base, exclude_bias_norm_from_wd=exclude), 0.1, 0.1)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert (net.bn.weight.detach() != 2.0).all() == (not exclude), (optimizer, exclude)


# --- the demo ----------------------------------------------------------------------------------------------------


def test_demo_file_matches_embedded_recipe():
    from largessl.demo import DEMO_OVERRIDES

    embedded = load_config(None, DEMO_OVERRIDES)
    from_file = load_config(ROOT / "configs" / "demo_digits.yaml", ["train.num_steps=0", "train.epochs=100"])
    embedded.train.num_steps = 0
    from_file.eval.online_probe = embedded.eval.online_probe
    assert from_file == embedded


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("_r50_in1k")],
                         ids=[p.stem for p in CONFIGS if p.stem.endswith("_r50_in1k")])
def test_paper_recipes_use_global_backbone_bn(path):
    """The reference code of every paper converts the whole model to SyncBatchNorm; so do our recipes."""
    assert load_config(path).model.sync_bn is True
