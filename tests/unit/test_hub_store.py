"""Hub on a local directory: push/list/show/pull round trip, immutability, integrity, load_backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir

from largessl.hub import Hub, IntegrityError, ModelRef, load_backbone
from largessl.hub.export import push_run
from largessl.hub.records import BACKBONE, CARD, INDEX, INDEX_HTML, PAGES_DIR
from largessl.hub.storage import LocalStorage
from largessl.hub.store import sha256_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


def _eval_results(run_dir: Path) -> None:
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "linear.json").write_text(json.dumps({"top1": 91.5, "top5": 99.0}))
    (run_dir / "eval" / "knn.json").write_text(json.dumps({"top1": {"20": 88.0, "200": 85.0}}))


def test_model_ref_parsing():
    assert ModelRef.parse("bt-r50-in1k@v1") == ModelRef("bt-r50-in1k", "v1")
    assert ModelRef.parse("bt-r50-in1k").version == "latest"
    for bad in ("../x", "a@../b", "@v1", "a b", "x@"):
        if bad == "x@":
            assert ModelRef.parse(bad).version == "latest"
            continue
        with pytest.raises(ValueError, match="not allowed"):
            ModelRef.parse(bad)


def test_push_list_show_pull_round_trip(run_dir, tmp_path):
    _eval_results(run_dir)
    hub_dir = tmp_path / "hub"
    card = push_run(run_dir, str(hub_dir), name="bt-r18-digits", version="v1")
    assert card["name"] == "bt-r18-digits" and card["version"] == "v1"
    assert card["method"] == "barlow_twins" and card["architecture"]["arch"] == "resnet18"
    assert card["architecture"]["small_input"] is True and card["architecture"]["num_features"] == 512
    assert card["epochs"] == 3 and card["git_revision"] == "0123456789abcdef"
    assert card["metrics"]["linear_top1"] == 91.5 and card["metrics"]["knn_top1"] == {"20": 88.0, "200": 85.0}
    assert card["metrics"]["collapse"] == {"std": 0.5, "corr": 0.1, "rankme": 7.5}
    assert card["loss_curve"][0] == [1.0, 100.0] and card["loss_curve"][-1] == [30.0, 100.0 / 30]
    assert card["config"]["model"]["arch"] == "resnet18" and card["created"].endswith("Z")
    stored = hub_dir / "models" / "bt-r18-digits" / "v1"
    assert card["files"][BACKBONE]["sha256"] == sha256_file(stored / BACKBONE)

    hub = Hub(str(hub_dir))
    push_run(run_dir, str(hub_dir), name="bt-r18-digits", version="v2")
    rows = hub.list()
    assert [(r["name"], r["version"], r["latest"]) for r in rows] == [
        ("bt-r18-digits", "v1", False), ("bt-r18-digits", "v2", True)]
    assert hub.show("bt-r18-digits@v1")["version"] == "v1"
    assert hub.show("bt-r18-digits")["version"] == "v2"  # latest alias
    assert hub.show("bt-r18-digits@latest")["version"] == "v2"
    with pytest.raises(ValueError, match="no version 'v9'.*v1, v2"):
        hub.show("bt-r18-digits@v9")
    with pytest.raises(ValueError, match="not in hub.*bt-r18-digits"):
        hub.show("nope@v1")

    dest = hub.pull("bt-r18-digits@v1", tmp_path / "pulled")
    assert sorted(p.name for p in dest.iterdir()) == [BACKBONE, CARD]
    assert sha256_file(dest / BACKBONE) == card["files"][BACKBONE]["sha256"]

    # the pulled weights are the checkpoint's backbone, in a plain torchvision ResNet
    net = load_backbone(dest)
    ref_net = load_backbone("bt-r18-digits@v1", hub=str(hub_dir))
    from largessl.hub.weights import load_backbone_from_checkpoint

    ckpt_net, _, _ = load_backbone_from_checkpoint(run_dir)
    x = torch.randn(2, 3, 32, 32)
    ckpt_net.eval()
    assert isinstance(net.fc, torch.nn.Identity) and net.num_features == 512
    torch.testing.assert_close(net(x), ckpt_net(x))
    torch.testing.assert_close(ref_net(x), ckpt_net(x))

    html = (hub_dir / INDEX_HTML).read_text()
    assert "bt-r18-digits" in html and "<svg" in html and "91.5" in html and "v2" in html
    assert f'href="{PAGES_DIR}/bt-r18-digits.html"' in html
    page = (hub_dir / PAGES_DIR / "bt-r18-digits.html").read_text()
    assert 'id="v-v1"' in page and 'id="v-v2"' in page and "load_backbone(&#x27;bt-r18-digits@v2&#x27;" in page


def test_versions_are_immutable(run_dir, tmp_path):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    before = (hub_dir / INDEX).read_bytes()
    weights = (hub_dir / "models/m/v1" / BACKBONE).read_bytes()
    with pytest.raises(ValueError, match="already exists.*immutable"):
        push_run(run_dir, str(hub_dir), name="m", version="v1")
    with pytest.raises(ValueError, match="already exists.*immutable"):  # the low-level API refuses too
        Hub(str(hub_dir)).push("m", "v1", {BACKBONE: str(hub_dir / "models/m/v1" / BACKBONE)}, {})
    assert (hub_dir / INDEX).read_bytes() == before
    assert (hub_dir / "models/m/v1" / BACKBONE).read_bytes() == weights


def test_crashed_push_is_invisible_and_can_be_redone(run_dir, tmp_path, monkeypatch):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    hub = Hub(str(hub_dir))

    def crash(*a, **k):
        raise OSError("simulated crash before the index update")

    # The process dies at the index write: its version folder is complete but unlisted (no cleanup runs
    # in a killed process, so discard is disabled too).
    monkeypatch.setattr(LocalStorage, "write_if", crash)
    monkeypatch.setattr(LocalStorage, "discard", lambda self, staged: None)
    with pytest.raises(OSError, match="simulated"):
        push_run(run_dir, str(hub_dir), name="m", version="v2")
    monkeypatch.undo()
    assert (hub_dir / "models/m/v2" / CARD).exists()
    assert [r["version"] for r in hub.list()] == ["v1"]
    assert hub.show("m")["version"] == "v1"
    with pytest.raises(ValueError, match="no version 'v2'"):
        hub.pull("m@v2", tmp_path / "x")
    card = push_run(run_dir, str(hub_dir), name="m", version="v2")  # the leftover is replaced
    assert hub.show("m")["files"] == card["files"]


def test_failed_push_cleans_up_after_itself(run_dir, tmp_path, monkeypatch):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(LocalStorage, "write_if", fail)
    with pytest.raises(OSError, match="disk full"):
        push_run(run_dir, str(hub_dir), name="m", version="v2")
    assert sorted(p.name for p in (hub_dir / "models/m").iterdir()) == ["v1"]  # no staging or v2 folder


@pytest.mark.parametrize("damage", ["tamper", "truncate", "delete", "card"])
def test_pull_refuses_damaged_files_and_writes_nothing(run_dir, tmp_path, damage):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    folder = hub_dir / "models/m/v1"
    target = folder / BACKBONE
    data = bytearray(target.read_bytes())
    if damage == "tamper":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "delete":
        target.unlink()
    else:  # a card edited to vouch for other bytes no longer matches the index
        card = json.loads((folder / CARD).read_text())
        card["metrics"]["linear_top1"] = 99.9
        (folder / CARD).write_text(json.dumps(card))
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError):
        Hub(str(hub_dir)).pull("m@v1", dest)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dest")] == []  # temp folder removed
    with pytest.raises(IntegrityError):
        load_backbone("m@v1", hub=str(hub_dir))


def test_pull_into_non_empty_destination_is_refused(run_dir, tmp_path):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        Hub(str(hub_dir)).pull("m", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_tampered_pulled_folder_is_refused_by_load_backbone(run_dir, tmp_path):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    dest = Hub(str(hub_dir)).pull("m", tmp_path / "dest")
    with open(dest / BACKBONE, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError):
        load_backbone(dest)


def test_full_checkpoint_is_published_pickle_free(run_dir, tmp_path):
    from largessl.hub.pickle_free import is_pickle_file, load_pickle_free
    from largessl.run.checkpoint import find_latest_checkpoint, load_model_state

    hub_dir = tmp_path / "hub"
    card = push_run(run_dir, str(hub_dir), name="m", version="v1", include_full_checkpoint=True)
    files = set(card["files"])
    assert {"checkpoint/model.safetensors", "checkpoint/COMPLETE.json", "checkpoint/meta.json",
            "checkpoint/training.safetensors", "checkpoint/training.json",
            "checkpoint/rank-00000.safetensors", "checkpoint/rank-00000.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".bin"))]
    stored = hub_dir / "models/m/v1"
    assert not [p for p in stored.rglob("*") if p.is_file() and is_pickle_file(p)]
    dest = Hub(str(hub_dir)).pull("m@v1", tmp_path / "dest")
    assert not [p for p in dest.rglob("*") if p.is_file() and is_pickle_file(p)]
    # the weights still load through the checkpoint API (COMPLETE.json lists the published files) ...
    state, config, _ = load_model_state(dest / "checkpoint")
    assert "projector.0.weight" in state and config["model"]["arch"] == "resnet18"
    # ... and every converted file gives back what torch.load(weights_only=True) of the original gave
    original = Path(find_latest_checkpoint(run_dir / "checkpoints"))
    for stem in ("training", "rank-00000"):
        expected = torch.load(original / f"{stem}.pt", weights_only=True)
        assert load_pickle_free(dest / "checkpoint" / f"{stem}.json") == expected
    marker = json.loads((dest / "checkpoint/COMPLETE.json").read_text())
    assert marker["pickle_free"]["converted"]["training.pt"] == ["training.safetensors", "training.json"]


def test_torch_hub_load_from_the_repo_directory(run_dir, tmp_path, repo_root):
    hub_dir = tmp_path / "hub"
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    dest = Hub(str(hub_dir)).pull("m@v1", tmp_path / "pulled")
    from largessl.hub.weights import load_backbone_from_checkpoint

    ref, _, _ = load_backbone_from_checkpoint(run_dir)
    x = torch.randn(2, 3, 32, 32)
    expected = ref.eval()(x)
    for checkpoint, kwargs in ((str(dest), {}), ("m@v1", {"hub": str(hub_dir)}), (str(run_dir), {})):
        net = torch.hub.load(str(repo_root), "resnet18", checkpoint=checkpoint, source="local", **kwargs)
        assert isinstance(net, torch.nn.Module) and not net.training
        torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="holds a resnet18 backbone, not resnet50"):
        torch.hub.load(str(repo_root), "resnet50", checkpoint=str(dest), source="local")


def test_hub_cli_local(run_dir, tmp_path, capsys):
    from largessl.cli import main

    hub_dir = str(tmp_path / "hub")
    assert main(["hub", "list", "--hub", hub_dir]) == 2  # no hub there yet: a mistyped path must not look empty
    assert main(["hub", "push", str(run_dir), "--hub", hub_dir, "--version", "v1"]) == 0
    assert "published barlow_twins-resnet18@v1" in capsys.readouterr().out  # default name: method-arch
    assert main(["hub", "show", "barlow_twins-resnet18@v1", "--hub", hub_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "barlow_twins-resnet18"
    assert main(["hub", "show", "missing", "--hub", hub_dir]) == 2
    assert main(["hub", "push", str(tmp_path / "no-run"), "--hub", hub_dir, "--version", "v2"]) == 2
    assert main(["hub", "pull", "barlow_twins-resnet18", str(tmp_path / "d"), "--hub", hub_dir]) == 0
    assert (tmp_path / "d" / BACKBONE).is_file()


def test_pages_escape_and_draw_curves():
    from largessl.hub.pages import loss_curve_svg, render_index_html, render_model_page

    model = {"latest": "v1", "versions": {"v1": {"created": "2026-01-01T00:00:00Z", "seq": 1,
             "summary": {"method": "vicreg", "metrics": {"linear_top1": 70.25, "knn_top1": {"20": 60.0}},
                         "loss_curve": [[1, 3.0], [2, 2.0], [3, 1.0]]}}}}
    html = render_index_html({"models": {"<b>x": model}}, hub_url="s3://b/hub")
    assert "&lt;b&gt;x" in html and "<b>x" not in html
    assert "70.2" in html and "k=20" in html and "<polyline" in html and "<script" not in html
    assert 'href="pages/&lt;b&gt;x.html"' in html
    page = render_model_page("<b>x", model, {"v1": "card tampered <i>"}, hub_url="s3://b/hub")
    assert "<b>x" not in page and "card tampered &lt;i&gt;" in page and 'href="../index.html"' in page
    assert loss_curve_svg([]).startswith("<span")
    assert "points=" in loss_curve_svg([[0, 1.0], [10, float("nan")], [20, 0.5]])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_yank_marks_deprecated_latest_skips_pulls_refuse_or_warn(run_dir, tmp_path, caplog, capsys):
    from largessl.cli import main

    hub_dir = tmp_path / "hub"
    for v in ("v1", "v2", "v3"):
        push_run(run_dir, str(hub_dir), name="m", version=v)
    hub = Hub(str(hub_dir))
    files_before = {k: v for k, v in _tree(hub_dir).items() if k.startswith("models/")}
    assert main(["hub", "yank", "m@v3", "--reason", "trained on a manifest with val images", "--hub",
                 str(hub_dir)]) == 0
    assert "yanked m@v3" in capsys.readouterr().out
    # nothing is deleted: every version's files are untouched
    assert {k: v for k, v in _tree(hub_dir).items() if k.startswith("models/")} == files_before
    assert hub.show("m")["version"] == "v2"  # latest skips the yanked version
    assert hub.show("m@v3")["yanked"]["reason"] == "trained on a manifest with val images"
    rows = {r["version"]: r for r in hub.list()}
    assert rows["v2"]["latest"] and not rows["v3"]["latest"] and rows["v3"]["yanked"]
    # an explicit pull of the yanked version is refused with the reason and the way out; nothing written
    with pytest.raises(ValueError, match=r"m@v3 was yanked on .*val images.*latest good version is m@v2.*--allow-yanked"):
        hub.pull("m@v3", tmp_path / "d3")
    assert not (tmp_path / "d3").exists() and not list(tmp_path.glob(".d3*"))
    assert main(["hub", "pull", "m@v3", str(tmp_path / "d3"), "--hub", str(hub_dir)]) == 2
    from largessl.hub.formats import export_model

    with pytest.raises(ValueError, match="was yanked"):
        export_model("m@v3", tmp_path / "e3", "torchvision", hub=str(hub_dir))
    assert not (tmp_path / "e3").exists()
    assert (export_model("m@v3", tmp_path / "e3", "torchvision", hub=str(hub_dir), allow_yanked=True)
            / "model.safetensors").is_file()
    # allowed: pulled, with a warning naming the reason
    caplog.clear()
    with caplog.at_level("WARNING"):
        dest = hub.pull("m@v3", tmp_path / "d3", allow_yanked=True)
    assert (dest / BACKBONE).is_file() and "yanked" in caplog.text and "val images" in caplog.text
    # load_backbone keeps code pinned to the version working, with the same warning; latest gives v2
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_backbone("m@v3", hub=str(hub_dir))
    assert "was yanked" in caplog.text
    with pytest.raises(ValueError, match="yanked"):
        load_backbone("m@v3", hub=str(hub_dir), allow_yanked=False)
    assert load_backbone("m", hub=str(hub_dir), with_card=True)[1]["version"] == "v2"
    # yanking twice, yanking 'latest', no reason, a missing version: clear errors
    with pytest.raises(ValueError, match="already yanked"):
        hub.yank("m@v3", "again")
    with pytest.raises(ValueError, match="explicit version"):
        hub.yank("m", "x")
    with pytest.raises(ValueError, match="--reason"):
        hub.yank("m@v2", " ")
    with pytest.raises(ValueError, match="no version 'v9'"):
        hub.yank("m@v9", "x")
    # every version yanked: 'latest' names none, and says so
    hub.yank("m@v2", "bad")
    hub.yank("m@v1", "bad")
    with pytest.raises(ValueError, match="every version of m .* is yanked"):
        hub.pull("m", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    page = (hub_dir / PAGES_DIR / "m.html").read_text()
    assert page.count('class="badge yanked"') >= 3 and "trained on a manifest with val images" in page


def test_bad_input_gets_a_clear_error_and_writes_nothing(run_dir, tmp_path, caplog):
    from largessl.cli import main

    hub_dir = tmp_path / "hub"
    # a run directory without a complete checkpoint (the save was interrupted: no COMPLETE.json)
    broken = tmp_path / "broken-run"
    (broken / "checkpoints" / "step-00000010").mkdir(parents=True)
    (broken / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(ValueError, match="no complete checkpoint found"):
        push_run(broken, str(hub_dir), name="m", version="v1")
    with caplog.at_level("ERROR"):
        assert main(["hub", "push", str(broken), "--hub", str(hub_dir), "--name", "m", "--version", "v1"]) == 2
    assert "no complete checkpoint found" in caplog.text
    assert not hub_dir.exists()
    # a missing model or version: exit code 2, nothing at the destination
    push_run(run_dir, str(hub_dir), name="m", version="v1")
    before = _tree(hub_dir)
    for ref in ("m@v2", "nope"):
        with pytest.raises(ValueError, match="no version 'v2'|not in hub"):
            Hub(str(hub_dir)).pull(ref, tmp_path / "dest")
        assert main(["hub", "pull", ref, str(tmp_path / "dest"), "--hub", str(hub_dir)]) == 2
    # an unknown export format
    assert main(["hub", "export", "m@v1", str(tmp_path / "dest"), "--format", "onnx", "--hub", str(hub_dir)]) == 2
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest*"))
    assert _tree(hub_dir) == before


def test_writes_to_a_store_without_conditional_writes_need_single_writer(run_dir, tmp_path):
    url = f"memory://hub-single-writer-{tmp_path.name}"
    with pytest.raises(RuntimeError, match="no conditional writes.*single_writer=True"):
        push_run(run_dir, url, name="m", version="v1")
    hub = Hub(url, single_writer=True)
    card = push_run(run_dir, name="m", version="v1", hub=hub)
    assert Hub(url).show("m@v1")["files"] == card["files"]  # reading needs no flag
    assert "m" in hub.storage.read("index.html").decode()


def test_an_index_write_that_succeeded_but_reported_an_error_keeps_the_version(run_dir, tmp_path, monkeypatch,
                                                                               caplog):
    """A lost reply must not make the push delete files the index already points at."""
    hub_dir = tmp_path / "hub"
    real = LocalStorage.write_if

    def applied_then_failed(self, rel, data, token):
        out = real(self, rel, data, token)
        if rel == INDEX:
            raise OSError("connection reset after the write was applied")
        return out

    monkeypatch.setattr(LocalStorage, "write_if", applied_then_failed)
    with caplog.at_level("WARNING"):
        card = push_run(run_dir, str(hub_dir), name="m", version="v1")
    monkeypatch.undo()
    assert "lists this push: published" in caplog.text
    assert Hub(str(hub_dir)).read_verified("m@v1")[0]["files"] == card["files"]
