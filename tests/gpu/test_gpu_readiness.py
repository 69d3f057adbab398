"""GPU readiness, round 2 (issue 24): what only a CUDA device can show (GPU tier; skipped with its reason on CPU).

1. bf16 really reaches the backbone under DeepSpeed (the dtype is read inside the backbone's convolutions).
2. A launch through ``torchrun`` with 2 processes on one GPU (both local ranks resolve to the one visible device).
3. The look-ahead spare image of a worker whose first batch is all unreadable, on the device.
4. Grayscale, progressive and CMYK JPEGs through the ``data.decode=gpu`` path against the CPU decode.
5. ``model.sync_bn`` and ``train.compile`` together, on 2 ranks.
6. A training step makes no host sync, counted on CUDA (pageable copies included).
7. The nvJPEG stage under allocator churn equals a serialised run (decode outputs never reuse busy memory).
"""

from __future__ import annotations

import io as pyio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_procs import ROOT, logs, pretrain, records, run_on_one_gpu
from gpu_procs import wait as wait_all
from PIL import Image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device: the GPU readiness tests need one")]

RUN = ["model.arch=resnet18", "model.small_input=true", "method.projector=256-256", "data.image_size=32",
       "data.augment=small", "data.num_workers=2", "data.shuffle_buffer=200", "train.device=cuda",
       "train.log_every=1", "log.progress=false", "log.tensorboard=false", "optim.warmup_epochs=1"]


def _args(digits: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*RUN, f"data.train_manifest={digits / 'train' / 'manifest.json'}", f"train.run_dir={run_dir}", *extra]


# 1 ------------------------------------------------------------------------------------------------------


def _deepspeed_backbone_dtypes(rank: int, world: int, run_dir: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic_stream import SyntheticStream

    from largessl.config import load_config
    from largessl.distributed.env import DistEnv
    from largessl.train.step import train_step
    from largessl.train.trainer import Trainer

    os.environ.setdefault("LOCAL_RANK", "0")
    cfg = load_config(None, ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32",
                             "train.global_batch_size=8", "train.device=cuda", "train.precision=bf16",
                             "dist.strategy=deepspeed", "dist.zero_stage=2", "log.progress=false",
                             "data.num_workers=0", "optim.warmup_epochs=1", f"train.run_dir={run_dir}"])
    trainer = Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32)
    seen: set[str] = set()
    for conv in (m for m in trainer.module.backbone.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
    batch = next(iter(trainer.stream.iterate(0))).to(trainer.device)
    out = train_step(trainer.model, batch.views, 0, trainer.optimizer, trainer.policy, trainer.scaler, 0.0,
                     trainer.engine)
    return {"conv": sorted(seen), "loss": str(out.loss.dtype), "autocast_outside": torch.is_autocast_enabled()}


def test_bf16_reaches_the_backbone_under_deepspeed(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'largessl[deepspeed]')")
    (res,) = run_on_one_gpu(_deepspeed_backbone_dtypes, 1, str(tmp_path / "run"))
    assert res["conv"] == ["torch.bfloat16"], res
    assert res["loss"] == "torch.float32", res


# 2 ------------------------------------------------------------------------------------------------------


def test_torchrun_two_processes_on_one_gpu(digits, tmp_path):
    run, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "largessl",
           "pretrain", *_args(digits, run, "dist.backend=cuda:gloo", "train.global_batch_size=32",
                              "train.num_steps=4", "checkpoint.every_steps=4")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="0")
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    # LOCAL_RANK=1 with one visible device: cuda:0, not "invalid device ordinal"
    assert "invalid device ordinal" not in out.stderr


# 3 ------------------------------------------------------------------------------------------------------


def test_the_spare_image_path_on_the_gpu():
    from largessl.data import device_batch
    from largessl.data.augment import recipe_specs
    from largessl.data.stream import _rng

    specs = recipe_specs("barlow_twins", 32, 2)
    dev = torch.device("cuda", 0)
    stage = device_batch.DeviceStage(specs, dev, lambda e, g, s: _rng("aug", 3, e, g, s))
    spare = device_batch._Source(torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8), 7, 1, "s0007", 80, 60)
    eb = device_batch.EncodedBatch(
        data=torch.empty(0, dtype=torch.uint8), lengths=[], jpeg_rows=[], cpu_images=[], cpu_rows=[],
        sizes=[(0, 0)] * 4, params=torch.zeros(4, 2, 16, dtype=torch.float64), ids=[0, 1, 2, 3],
        labels=torch.full((4,), -1), keys=[""] * 4, urls=[""] * 4, epoch=0, spare=spare).pin_memory()
    (batch,) = list(stage.run([eb]))  # record_stream on a CPU tensor raised NotImplementedError here
    torch.cuda.synchronize()
    assert all(v.device == dev and v.shape == (4, 3, 32, 32) for v in batch.views)
    assert batch.keys == ["s0007"] * 4 and batch.labels.device == dev


# 4 ------------------------------------------------------------------------------------------------------


def _encode(img: Image.Image, **kw) -> bytes:
    buf = pyio.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["grayscale", "progressive", "cmyk", "baseline"])
def test_jpeg_kinds_through_the_gpu_path_match_the_cpu_decode(kind):
    from skimage import data

    from largessl.data.decode import decode_cpu, decode_jpegs, probe

    img = Image.fromarray(data.astronaut()).resize((200, 160))
    encoded = {"grayscale": lambda: _encode(img.convert("L")), "progressive": lambda: _encode(img, progressive=True),
               "cmyk": lambda: _encode(img.convert("CMYK")), "baseline": lambda: _encode(img)}[kind]()
    ref = torch.from_numpy(decode_cpu(encoded)).permute(2, 0, 1).float()
    info = probe(encoded)
    if kind == "cmyk":
        assert not info.device_decodable  # the worker decodes CMYK on the CPU: nvJPEG's colour conversion differs
        return
    assert info.device_decodable
    (out,) = decode_jpegs([torch.frombuffer(bytearray(encoded), dtype=torch.uint8)], torch.device("cuda", 0))
    assert out is not None and out.is_cuda and out.shape == ref.shape
    diff = (out.cpu().float() - ref).abs()
    print(f"{kind}: nvJPEG vs CPU decode, mean {diff.mean():.3f} / max {diff.max():.0f} levels")
    assert diff.mean() < 1.5


# 5 ------------------------------------------------------------------------------------------------------


def test_sync_bn_and_compile_together_on_two_ranks(digits, tmp_path):
    run, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    args = _args(digits, run, "dist.backend=cuda:gloo", "model.sync_bn=true", "train.compile=true",
                 "train.precision=bf16", "train.global_batch_size=64", "train.num_steps=6",
                 "checkpoint.every_steps=6")
    assert wait_all(pretrain(2, args, log_dir)) == [0, 0], logs(log_dir)
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


# 6 ------------------------------------------------------------------------------------------------------


def _count_on_cuda(method: str, run_dir: str) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic_stream import SyntheticStream

    from largessl.bench.step import count_step_host_syncs
    from largessl.config import load_config
    from largessl.distributed.env import DistEnv
    from largessl.train.trainer import Trainer

    views = ["method.num_views=2"] if method == "multiview" else []
    cfg = load_config(None, ["model.arch=resnet18", "model.small_input=true", "method.projector=32-32",
                             f"method.name={method}", *views, "train.global_batch_size=8", "train.device=cuda",
                             "log.progress=false", "data.num_workers=0", "optim.warmup_epochs=1",
                             f"train.run_dir={run_dir}"])
    trainer = Trainer(cfg, DistEnv(), SyntheticStream(32, 8, 0, 1), 32)
    batches = iter([b.pin_memory() for b in trainer.stream.iterate(0)])  # as the DataLoader hands them over
    return count_step_host_syncs(trainer, batches, steps=2, warmup=1, count_data=False)


@pytest.mark.parametrize("method", ["barlow_twins", "vicreg", "simsiam", "multiview", "decorrelation"])
def test_a_training_step_makes_no_host_sync_on_cuda(tmp_path, method):
    (per_step,) = run_on_one_gpu(_count_on_cuda, 1, method, str(tmp_path / "run"))
    print(f"{method}: host syncs per step on CUDA {per_step}")
    assert per_step == ([{"linalg_eigh": 2}] * 2 if method == "decorrelation" else [{}, {}])


# 7 ------------------------------------------------------------------------------------------------------


def test_gpu_decode_under_allocator_churn_equals_a_serialised_run(tmp_path):
    """nvJPEG writes on its own stream. With a consumer that keeps freeing and allocating on the current stream
    and the stage running one batch ahead, every batch must equal a run where the host waits after each batch
    (no overlap, so no block can be reused early). A decode that reused memory still in use by queued kernels
    would differ here."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data_gpu import _shards

    from largessl.data.config import DataConfig
    from largessl.data.manifest import read_manifest
    from largessl.data.stream import build_train_stream

    m = read_manifest(_shards(tmp_path / "d", 96))
    cfg = DataConfig(augment="barlow_twins", image_size=96, num_workers=2, shuffle_buffer=8, decode="gpu",
                     pin_memory=True)

    def run(serialise: bool) -> list[list[torch.Tensor]]:
        out = []
        for b in build_train_stream(cfg, m, 16, 0, 1, seed=2, device="cuda").iterate(0):
            if serialise:
                torch.cuda.synchronize()
            else:  # churn: allocate, write and free on the consumer's stream while the next batch is queued
                for _ in range(4):
                    junk = torch.full((8 << 20,), 255, dtype=torch.uint8, device="cuda")
                    del junk
            out.append([v.cpu() for v in b.views])
        return out

    calm, busy = run(True), run(False)
    assert len(calm) == len(busy) == 6
    for x, y in zip(calm, busy):
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(x, y))
