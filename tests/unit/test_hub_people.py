"""The hub from a terminal: a readable `hub show`, `hub list` filters and sorting, a missing hub is an error,
snippets that name the hub the reader opened, numbers rounded for people, and the model's eval transform."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir
from PIL import Image

from largessl.cli import main
from largessl.hub import Hub, load_backbone
from largessl.hub.export import push_run


def _with_evals(run_dir: Path, linear: float, knn: dict) -> Path:
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "linear.json").write_text(json.dumps({"top1": linear, "top5": 99.0}))
    (run_dir / "eval" / "knn.json").write_text(json.dumps({"top1": knn}))
    return run_dir


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("people")
    hub = str(root / "hub")
    a = _with_evals(make_run_dir(root / "a", epoch=3, overrides=["data.image_size=32"]), 71.25, {"20": 60.0})
    b = _with_evals(make_run_dir(root / "b", overrides=["method.name=vicreg", "data.image_size=32"], seed=1),
                    80.5, {"20": 50.0, "200": 65.0})
    push_run(a, hub, name="bt-r18", version="v1")
    push_run(b, hub, name="vicreg-r18", version="v1")
    return Path(hub)


def test_show_leads_with_a_summary_and_json_gives_the_record(hub_dir: Path, capsys) -> None:
    assert main(["hub", "show", "vicreg-r18", "--hub", str(hub_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vicreg-r18@v1" and out[1].startswith("evaluation  knn top-1 k=20 50, k=200 65; linear top-1 80.5")
    text = "\n".join(out)
    assert "method      vicreg" in text and "backbone    resnet18" in text and "trained     3 epochs" in text
    assert f"load_backbone('vicreg-r18@v1', hub='{hub_dir}', with_transform=True)" in text
    assert len(out) < 20  # a summary, not the 300-line record
    assert main(["hub", "show", "vicreg-r18", "--hub", str(hub_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "vicreg"


def test_list_filters_and_sorts(hub_dir: Path, capsys) -> None:
    def names(*args: str) -> list[str]:
        assert main(["hub", "list", "--hub", str(hub_dir), *args]) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()]

    assert names() == ["bt-r18@v1", "vicreg-r18@v1"]
    assert names("--method", "vicreg") == ["vicreg-r18@v1"]
    assert names("--arch", "resnet18", "--sort", "knn") == ["vicreg-r18@v1", "bt-r18@v1"]  # 65 (k=200) > 60
    assert names("--sort", "linear") == ["vicreg-r18@v1", "bt-r18@v1"]
    assert names("--dataset", "no-such-data") == ["none"]
    assert main(["hub", "list", "--hub", str(hub_dir), "--sort", "speed"]) == 2


def test_a_missing_or_empty_hub_is_an_error(tmp_path: Path) -> None:
    for args in (["list"], ["show", "bt-r18"], ["pull", "bt-r18", str(tmp_path / "d")], ["pages"]):
        assert main(["hub", *args, "--hub", str(tmp_path / "hubb")]) == 2, args
    assert not (tmp_path / "hubb").exists()  # reading never creates a hub
    empty = tmp_path / "empty"
    Hub(str(empty)).write_index_html({"models": {}})  # a hub folder whose index holds no model
    (empty / "index.json").write_text(json.dumps({"format": "largessl-hub-index/2", "models": {}, "seq": 0}))
    assert main(["hub", "list", "--hub", str(empty)]) == 2


def test_snippets_use_the_hub_the_reader_opened(hub_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mirror"
    shutil.copytree(hub_dir, copy)
    card = Hub(str(copy)).show("bt-r18")
    assert card["snippets"] and all(str(hub_dir) not in code for code in card["snippets"].values())
    assert f"hub={str(copy)!r}" in card["snippets"]["largessl"]
    Hub(str(copy)).refresh_pages(None)
    page = (copy / "pages" / "bt-r18.html").read_text()
    assert str(copy) in page and f"hub=&#x27;{hub_dir}" not in page and f"hub='{hub_dir}" not in page


def test_load_backbone_with_the_eval_transform(hub_dir: Path) -> None:
    from largessl.data.augment import build_eval_transform

    net, card, transform = load_backbone("bt-r18", hub=str(hub_dir), with_card=True, with_transform=True)
    assert transform.image_size == 32 == card["config"]["data"]["image_size"]
    img = Image.effect_noise((50, 40), 60).convert("RGB")
    x = transform(img)
    torch.testing.assert_close(x, build_eval_transform("eval", 32)(img)[0])  # what kNN/linear evaluation saw
    assert x.shape == (3, 32, 32) and abs(float(x.mean())) < 3
    assert net(x.unsqueeze(0)).shape == (1, net.num_features)


def test_numbers_are_rounded_for_people() -> None:
    from largessl.hub.records import human_number

    assert [human_number(v) for v in (13.636363636363637, 100.0, 3, None, 0.04)] == ["13.6", "100", "3", "-", "0"]
    assert human_number(71.256, 2) == "71.26"
