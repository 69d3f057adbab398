"""Model cards: data set identity, paper and recipe differences, evaluations with protocols, skips, snippets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hub_runs import make_run_dir

from largessl.data.manifest import parse_manifest, write_manifest
from largessl.hub import Hub
from largessl.hub.card import dataset_info, dataset_name, paper_info
from largessl.hub.export import push_run
from largessl.hub.formats import FORMATS


def _manifest(path: Path, extra: dict | None = None) -> str:
    url = str(path)
    write_manifest(url, [{"url": "train-000000.tar", "num_samples": 10, "sha256": "ab" * 32, "bytes": 100},
                         {"url": "train-000001.tar", "num_samples": 6, "sha256": "cd" * 32, "bytes": 60}],
                   ["cat", "dog", "eel"], extra=extra)
    return url


def test_dataset_is_named_by_the_manifest_not_the_split(tmp_path):
    url = _manifest(tmp_path / "imagenet" / "train" / "manifest.json")
    info = dataset_info({"data": {"train_manifest": url}})
    raw = Path(url).read_bytes()
    assert info["name"] == "imagenet" and info["split"] == "train"
    assert info["manifest_id"] == parse_manifest(raw, url).id
    assert info["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (info["num_samples"], info["num_classes"], info["num_shards"]) == (16, 3, 2)
    # a name recorded by the writer wins; the digits writer nests it under its parameters
    named = _manifest(tmp_path / "x" / "train" / "manifest.json", {"name": "ImageNet-1k"})
    assert dataset_info({"data": {"train_manifest": named}})["name"] == "ImageNet-1k"
    assert dataset_name("s3://b/d/val/manifest.json", {"digits": {"dataset": "sklearn-digits"}}) == \
        ("sklearn-digits", "val")
    assert dataset_name("s3://bucket/laion-subset/manifest.json", {}) == ("laion-subset", "")
    # unreadable at push time: the card says so instead of failing the push
    missing = dataset_info({"data": {"train_manifest": str(tmp_path / "gone" / "train" / "manifest.json")}})
    assert missing["name"] == "gone" and missing["manifest_id"] is None and "unreadable" in missing["note"]


def test_paper_and_differences_from_the_paper_recipe():
    from largessl.config import config_to_dict, load_config

    run = config_to_dict(load_config("configs/barlow_twins_r50_in1k.yaml",
                                     ["train.epochs=300", "model.arch=resnet18", "data.num_workers=2",
                                      "train.run_dir=/tmp/x", "method.collective=all_gather"]))
    info = paper_info(run)
    assert "Barlow Twins" in info["citation"] and "2021" in info["citation"]
    assert info["url"] == "https://arxiv.org/abs/2103.03230" and info["recipe"] == "configs/barlow_twins_r50_in1k.yaml"
    diffs = {d["key"]: (d["paper"], d["run"]) for d in info["differences"]}
    assert diffs == {"train.epochs": (1000.0, 300.0), "model.arch": ("resnet50", "resnet18")}  # plumbing ignored
    same = paper_info(config_to_dict(load_config("configs/vicreg_r50_in1k.yaml", [])))
    assert same["differences"] == [] and "VICReg" in same["citation"]


def test_card_holds_what_a_downstream_team_needs(tmp_path):
    manifest = _manifest(tmp_path / "data" / "imagenet" / "train" / "manifest.json")
    run = make_run_dir(tmp_path / "run", overrides=[f"data.train_manifest={manifest}", "hub.license=cc-by-nc-4.0"])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 31, "loss": 3.0, "skipped_samples": 4, "skipped_shards": 1}) + "\n")
    (run / "eval").mkdir()
    (run / "eval" / "linear.json").write_text(json.dumps(
        {"top1": 71.5, "top5": 90.1, "protocol": "cached_features", "epochs": 100, "lr": 0.02, "batch_size": 256,
         "weight_decay": 1e-6, "num_train": 1000, "num_val": 200}))
    (run / "eval" / "knn.json").write_text(json.dumps(
        {"top1": {"20": 60.0, "200": 58.0}, "k": [20, 200], "temperature": 0.07, "num_train": 1000, "num_val": 200}))
    # a stage added later (another team's finetune) shows up without changes here
    (run / "eval" / "finetune_1pct.json").write_text(json.dumps({"top1": 45.0, "top5": 70.0, "epochs": 20, "lr": 0.05}))
    (run / "eval" / ".linear.json.tmp-9").write_text("{half")
    hub_dir = tmp_path / "hub"
    card = push_run(run, str(hub_dir), name="bt", version="v1")
    assert card["dataset"]["name"] == "imagenet" and card["dataset"]["manifest_id"]
    assert card["dataset"]["manifest_sha256"] == hashlib.sha256(Path(manifest).read_bytes()).hexdigest()
    assert card["method"] == "barlow_twins" and "Zbontar" in card["paper"]["citation"]
    assert {"key": "train.epochs", "paper": 1000.0, "run": 100.0} in card["paper"]["differences"]
    m = card["metrics"]
    assert (m["linear_top1"], m["linear_top5"], m["finetune_1pct_top1"]) == (71.5, 90.1, 45.0)
    assert m["knn_top1"] == {"20": 60.0, "200": 58.0} and m["collapse"] == {"std": 0.5, "corr": 0.1, "rankme": 7.5}
    ev = card["evaluation"]
    assert set(ev) == {"linear", "knn", "finetune_1pct"}
    assert ev["linear"]["protocol"].startswith("linear probe on frozen features, protocol cached_features, epochs 100")
    assert "k=20, 200" in ev["knn"]["protocol"] and "temperature 0.07" in ev["knn"]["protocol"]
    assert ev["finetune_1pct"]["protocol"].startswith("fine-tuning with 1% of the labels, epochs 20")
    assert card["data_skips"] == {"skipped_samples": 4, "skipped_shards": 1}
    assert card["git_revision"] == "0123456789abcdef" and card["license"] == "cc-by-nc-4.0"
    assert set(card["snippets"]) == {"largessl", "torch.hub", *FORMATS}
    assert "load_backbone('bt@v1'" in card["snippets"]["largessl"]
    assert "--format torchvision" in card["snippets"]["torchvision"]
    assert card["snippets"]["timm"].startswith("# not available: ") and "small-input stem" in card["snippets"]["timm"]
    assert Hub(str(hub_dir)).show("bt@v1") == card


def test_skip_counters_fall_back_to_the_checkpoint_meta():
    from largessl.hub.card import skip_counters

    assert skip_counters([{"step": 1, "loss": 1.0}], {"metrics": {"skipped_samples": 2}}) == {"skipped_samples": 2}
    assert skip_counters([], {}) == {}


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippets_for_imagenet_resnets_name_every_format(fmt):
    from largessl.hub.formats import load_snippets

    s = load_snippets("bt@v1", "s3://models/hub", "resnet50", False)[fmt]
    assert not s.startswith("# not available") and f"--format {fmt}" in s and "bt@v1" in s
