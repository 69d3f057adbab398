"""The hub on a real S3 server (SeaweedFS): CLI round trip, immutability, tamper/truncation refusal, claims."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from hub_runs import make_run_dir

from largessl.cli import main
from largessl.hub import Hub, IntegrityError, load_backbone
from largessl.hub.export import push_run
from largessl.hub.records import BACKBONE, CARD
from largessl.hub.weights import load_backbone_from_checkpoint


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """AWS_* variables pointing at the test server, as a user would configure them."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_s3_hub_round_trip_immutability_and_integrity(aws_env, tmp_path: Path, capsys) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    hub_url = aws_env.url("hub-round-trip")
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v1"]) == 0
    assert "load_backbone('bt-r18@v1'" in capsys.readouterr().out
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v2"]) == 0
    # immutability: exit code 2 (bad input) and the stored version is unchanged
    fs = aws_env.filesystem()
    root = hub_url[len("s3://"):]
    v1_path, v2_path = Hub(hub_url).version_path("bt-r18", "v1"), Hub(hub_url).version_path("bt-r18", "v2")
    assert v1_path.startswith(f"{root}/models/bt-r18/v1/")  # one prefix per push attempt
    before = fs.cat_file(f"{v1_path}/{BACKBONE}")
    objects_before = sorted(fs.find(root))
    assert main(["hub", "push", str(run_dir), "--hub", hub_url, "--name", "bt-r18", "--version", "v1"]) == 2
    fs.invalidate_cache()
    assert fs.cat_file(f"{v1_path}/{BACKBONE}") == before
    assert sorted(fs.find(root)) == objects_before  # the refused push wrote nothing

    capsys.readouterr()
    assert main(["hub", "list", "--hub", hub_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bt-r18@v1 ") and out[1].startswith("bt-r18@v2 (latest)")
    assert main(["hub", "show", "bt-r18", "--hub", hub_url, "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == "v2" and card["architecture"]["arch"] == "resnet18"
    assert "<svg" in fs.cat_file(f"{root}/index.html").decode()
    assert 'id="v-v2"' in fs.cat_file(f"{root}/pages/bt-r18.html").decode()

    dest = tmp_path / "pulled"
    assert main(["hub", "pull", "bt-r18@v1", str(dest), "--hub", hub_url]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [BACKBONE, CARD]
    x = torch.randn(2, 3, 32, 32)
    ref, _, _ = load_backbone_from_checkpoint(run_dir)
    torch.testing.assert_close(load_backbone("bt-r18@v1", hub=hub_url)(x), ref.eval()(x))
    torch.testing.assert_close(load_backbone(dest)(x), ref(x))

    # tampered and truncated objects are refused and nothing is written at the destination
    fs.pipe_file(f"{v2_path}/{BACKBONE}", before[:-1] + bytes([before[-1] ^ 1]))
    assert main(["hub", "pull", "bt-r18@v2", str(tmp_path / "t1"), "--hub", hub_url]) == 3
    fs.pipe_file(f"{v2_path}/{BACKBONE}", before[: len(before) // 2])
    with pytest.raises(IntegrityError, match="truncated"):
        Hub(hub_url).pull("bt-r18@v2", tmp_path / "t2")
    with pytest.raises(IntegrityError):
        load_backbone("bt-r18@v2", hub=hub_url)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".t")]


def test_s3_store_honours_conditional_writes(aws_env):
    """The protocol's premise, checked on the server the tests use: If-None-Match and If-Match are enforced."""
    hub = Hub(aws_env.url("hub-cas"))
    st = hub.storage
    st.check_conditional_writes()
    t1 = st.write_if("k.json", b"1", None)
    assert t1 is not None and st.write_if("k.json", b"2", None) is None  # exists: create refused
    t2 = st.write_if("k.json", b"3", t1)
    assert t2 is not None and st.write_if("k.json", b"4", t1) is None  # stale token refused
    assert st.read_versioned("k.json") == (b"3", t2)


def _crash_after_first_file(hub_url: str, run_dir: str, lease_s: float) -> None:
    """A push that dies (SIGKILL, no cleanup) after uploading one file: its claim and files stay behind."""
    import signal

    from largessl.hub.storage import S3Storage

    def dying(self, name, version, push_id, files, card_name, card_raw):
        rel, src = next(iter(files.items()))
        self.fs.put_file(str(src), f"{self.root}/models/{name}/{version}/{push_id}/{rel}")
        os.kill(os.getpid(), signal.SIGKILL)

    S3Storage.stage_version = dying
    push_run(run_dir, name="m", version="v1", hub=Hub(hub_url, lease_s=lease_s))


def test_dead_push_claim_blocks_until_its_lease_expires(aws_env, tmp_path):
    import multiprocessing as mp

    run_dir = make_run_dir(tmp_path / "run", arch="repro_convnet", small_input=False)
    hub_url = aws_env.url("hub-claims")
    lease_s = 3.0
    # spawned: a fork of this threaded process (s3fs runs an event loop thread) can deadlock in the child
    child = mp.get_context("spawn").Process(target=_crash_after_first_file, args=(hub_url, str(run_dir), lease_s))
    child.start()
    child.join(120)
    assert child.exitcode == -9  # killed mid-upload
    claim = json.loads(Hub(hub_url).storage.read("claims/m/v1.json"))
    # while the dead push's lease runs, the version is refused at once (no upload), naming the holder
    with pytest.raises(ValueError, match=r"m@v1 is being published by another push .*claim expires at"):
        push_run(run_dir, hub_url, name="m", version="v1")
    assert Hub(hub_url).list() == []
    # after the lease, the next push takes the claim over and publishes; the dead push's files stay unlisted
    time.sleep(max(0.0, claim["expires"] - time.time()) + 0.2)  # waiting out the lease is the behaviour under test
    card = push_run(run_dir, hub_url, name="m", version="v1")
    hub = Hub(hub_url)
    assert [r["version"] for r in hub.list()] == ["v1"]
    assert claim["push_id"] not in hub.version_path("m", "v1")
    assert hub.read_verified("m@v1")[0]["files"] == card["files"]


def test_a_push_that_lost_its_claim_cannot_publish(aws_env, tmp_path, monkeypatch):
    """Fencing: a stalled push whose lease expired and was taken over aborts; the index keeps the new owner."""
    from largessl.hub import store
    from largessl.hub.storage import S3Storage

    run_a = make_run_dir(tmp_path / "a", arch="repro_convnet", small_input=False, seed=1)
    run_b = make_run_dir(tmp_path / "b", arch="repro_convnet", small_input=False, seed=2)
    hub_url = aws_env.url("hub-fencing")
    stalled, resume = threading.Event(), threading.Event()
    real_stage = S3Storage.stage_version
    real_lease = store._Lease.__init__

    def stage(self, name, version, push_id, files, card_name, card_raw):
        if threading.current_thread().name == "push-a":
            stalled.set()
            assert resume.wait(120)
        return real_stage(self, name, version, push_id, files, card_name, card_raw)

    def lease(self, storage, rel, body, token, lease_s):
        real_lease(self, storage, rel, body, token, lease_s)
        if threading.current_thread().name == "push-a":
            self.stop()  # a stalled process renews nothing

    monkeypatch.setattr(S3Storage, "stage_version", stage)
    monkeypatch.setattr(store._Lease, "__init__", lease)
    errors: list[BaseException] = []

    def push_a() -> None:
        try:
            push_run(run_a, name="m", version="v1", hub=Hub(hub_url, lease_s=1.0))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=push_a, name="push-a")
    t.start()
    assert stalled.wait(120)
    time.sleep(1.2)  # A's one-second lease runs out while it is stalled
    card_b = push_run(run_b, hub_url, name="m", version="v1")
    resume.set()
    t.join(120)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "lost its claim" in str(errors[0])
    hub = Hub(hub_url)
    assert hub.read_verified("m@v1")[0]["files"] == card_b["files"]
