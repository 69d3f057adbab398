"""Label subsets for the semi-supervised protocol: class-balanced seeded draws, image lists, reuse, verification."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from largessl.cli import main
from largessl.data.manifest import read_manifest
from largessl.data.subset import SubsetRequest, build_subset, scan_shard, verify_subset
from largessl.data.writer import write_source


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from largessl.data.digits import write_digits_shards

    return write_digits_shards(str(tmp_path_factory.mktemp("digits")), image_size=8)[0]


def _samples(url: str) -> list[tuple[str, int]]:
    m = read_manifest(url)
    return [(k, lab) for i in range(len(m.shards)) for k, lab in zip(scan_shard(m, i).keys, scan_shard(m, i).labels)]


def test_seeded_draw_is_class_balanced_deterministic_and_reused(digits: str, tmp_path: Path) -> None:
    source = _samples(digits)
    per_class = Counter(lab for _, lab in source)
    a = build_subset(digits, str(tmp_path / "a"), SubsetRequest(percent=10, seed=0), workers=3, progress=False)
    got = _samples(a)
    counts = Counter(lab for _, lab in got)
    assert counts == {c: max(1, int(n * 0.1 + 0.5)) for c, n in per_class.items()}  # every class keeps ~10%
    assert set(got) <= set(source) and len({k for k, _ in got}) == len(got)
    # the same request elsewhere, with another worker count, gives byte-identical shards (same manifest id)
    b = build_subset(digits, str(tmp_path / "b"), SubsetRequest(percent=10, seed=0), workers=1, progress=False)
    assert read_manifest(a).id == read_manifest(b).id
    info = read_manifest(a).extra["subset"]
    assert info["method"] == "seeded" and info["source_id"] == read_manifest(digits).id and info["num_selected"] == len(got)
    # another seed draws other samples; 1% still keeps one sample per class at least
    c = build_subset(digits, str(tmp_path / "c"), SubsetRequest(percent=10, seed=1), workers=2, progress=False)
    assert {k for k, _ in _samples(c)} != {k for k, _ in got}
    one = build_subset(digits, str(tmp_path / "one"), SubsetRequest(percent=1), progress=False)
    assert all(n >= 1 for n in Counter(lab for _, lab in _samples(one)).values())
    # reuse: the identical request returns the existing subset untouched; a different one is refused
    before = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    assert build_subset(digits, str(tmp_path / "a"), SubsetRequest(percent=10, seed=0), progress=False) == a
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="holds a different dataset"):
        build_subset(digits, str(tmp_path / "a"), SubsetRequest(percent=10, seed=5), progress=False)
    assert verify_subset(a)["percent"] == 10.0


def test_verify_catches_a_tampered_subset(digits: str, tmp_path: Path) -> None:
    url = build_subset(digits, str(tmp_path / "s"), SubsetRequest(percent=20), progress=False)
    verify_subset(url)
    # a subset whose shards hold other samples than the selection (here: a 30% draw relabelled as 20%)
    other = build_subset(digits, str(tmp_path / "t"), SubsetRequest(percent=30), progress=False)
    data = json.loads(Path(other).read_text())
    data["extra"]["subset"]["percent"] = 20.0
    Path(other).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not the ones its manifest records|does not match the selection"):
        verify_subset(other)
    # a shard whose bytes changed after the manifest was written
    shard = next((tmp_path / "s").glob("subset-*.tar"))
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        verify_subset(url)


def _image_folder(root: Path) -> None:
    for c, cls in enumerate(["n01", "n02", "n03"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / cls / f"{cls}_{i}.JPEG")


def test_simclr_style_list_files_select_by_image_name(tmp_path: Path) -> None:
    root = tmp_path / "imagefolder"
    _image_folder(root)
    manifest = write_source(str(root), str(tmp_path / "shards"), shard_bytes=4000, progress=False)
    listing = tmp_path / "1percent.txt"
    listing.write_text("# SimCLR-style list\nn01_2.JPEG\nn03_0.JPEG\n\nn03_3.JPEG\n")
    url = build_subset(manifest, str(tmp_path / "sub"), SubsetRequest(list_file=str(listing)), progress=False)
    got = sorted(_samples(url))
    # shard keys number the sorted ImageFolder listing: n01_2 is #2, n03_0 is #8, n03_3 is #11
    assert got == [("000000002", 0), ("000000008", 2), ("000000011", 2)]
    info = verify_subset(url)
    assert info["method"] == "list" and len(info["list_sha256"]) == 64
    keys = tmp_path / "keys.txt"
    keys.write_text("000000002\n000000008\n000000011\n")  # shard keys work without the ImageFolder
    same = build_subset(manifest, str(tmp_path / "by-key"), SubsetRequest(list_file=str(keys)), progress=False)
    assert sorted(_samples(same)) == got
    bad = tmp_path / "bad.txt"
    bad.write_text("n01_2.JPEG\nn09_1.JPEG\n")
    with pytest.raises(ValueError, match="1 entries of .* are not in"):
        build_subset(manifest, str(tmp_path / "x"), SubsetRequest(list_file=str(bad)), progress=False)
    (root / "n02" / "n02_1.JPEG").rename(root / "n02" / "n01_9.JPEG")  # a name whose class prefix lies
    lying = tmp_path / "lying.txt"
    lying.write_text("n01_9.JPEG\n")
    with pytest.raises(ValueError, match="listed for class n01 but its shard label is n02"):
        build_subset(manifest, str(tmp_path / "y"), SubsetRequest(list_file=str(lying)), progress=False)


def test_shards_subset_cli(digits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "sub10"
    assert main(["shards", "subset", digits, str(dest), "--percent", "10", "--verify", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "manifest.json")
    assert main(["shards", "subset", digits, str(dest), "--percent", "1", "--no-progress"]) == 2  # not overwritten
    with pytest.raises(SystemExit):  # argparse: one of --percent / --list is required
        main(["shards", "subset", digits, str(dest), "--no-progress"])
