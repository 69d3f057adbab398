"""``largessl bench knn``: time and peak memory of the sharded kNN at ImageNet shape, on W gloo ranks.

ImageNet shape: 1,281,167 train features of width 2048, 50,000 queries, k = 200, 1000 classes. On CPU the
full problem is hours, so the benchmark runs a ``--fraction`` of both the train and the query rows
(default 1/20: 64,058 × 2048 train, 2,500 queries) and extrapolates:

* time: the scoring work (similarity tiles and top-k) is proportional to queries × train rows, so the
  full time is the measured time × (1/fraction)² — an upper bound, because the vote and the candidate
  exchange grow only with the queries (×1/fraction). Both parts are reported.
* memory: per rank, the kNN's peak resident memory on top of what the rank already holds (its shard and
  queries; ``VmHWM`` after a reset through ``/proc/self/clear_refs``, so earlier peaks do not count, and
  after a tiny warm-up call so one-time library buffers do not either). That working set does not grow
  with the rows; the shard does. The full-scale estimate is the full shard + queries + the measured
  working set.

Features are synthetic (Gaussian rows, random labels): the kNN's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000


class PeakRSS:
    """Peak resident memory of this process since :meth:`reset` (Linux ``VmHWM``; reset via ``clear_refs``)."""

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}; peak memory needs Linux")

    def __init__(self) -> None:
        self.baseline = 0

    def reset(self) -> int:
        """Forget earlier peaks; returns the current resident bytes (the baseline)."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)
        self.baseline = self._status("VmRSS")
        return self.baseline

    def peak_above_baseline(self) -> int:
        """Peak resident bytes since :meth:`reset`, minus the baseline."""
        return self._status("VmHWM") - self.baseline

    @staticmethod
    def available() -> bool:
        """True where the peak can be reset and read (Linux with a writable clear_refs)."""
        try:
            PeakRSS().reset()
            return True
        except OSError:
            return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``largessl bench knn``."""
    p.add_argument("--train", type=int, default=IMAGENET_TRAIN, help="train rows at full scale (ImageNet)")
    p.add_argument("--queries", type=int, default=IMAGENET_VAL, help="query rows at full scale")
    p.add_argument("--dim", type=int, default=2048, help="feature width (ResNet-50: 2048)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--fraction", type=float, default=0.05, help="part of the train and query rows run (1/20)")
    p.add_argument("--ranks", type=int, default=2, help="gloo ranks (processes on this machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--chunk", type=int, default=512, help="queries per chunk (eval.knn_chunk_size)")
    p.add_argument("--block", type=int, default=32768, help="train rows per tile (eval.knn_train_block)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    p.add_argument("--out", default=None, help="write the result as JSON here")


def _worker(rank: int, world: int, port: int, args: dict[str, Any], queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from largessl.eval.knn import KnnShard, chunk_working_set_bytes, knn_predict, prepare_features

    torch.set_num_threads(args["threads"])
    device = torch.device(f"cuda:{rank}" if args["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
        n, q, d = args["n"], args["q"], args["dim"]
        lo, hi = rank * n // world, (rank + 1) * n // world
        qlo, qhi = rank * q // world, (rank + 1) * q // world
        meter = PeakRSS()
        g = torch.Generator().manual_seed(1000 + rank)
        # this rank's rows only, prepared in blocks (the float64 normalisation is row-wise)
        shard = torch.empty((hi - lo, d), dtype=torch.float16)
        for s in range(0, hi - lo, 8192):
            shard[s:s + 8192] = prepare_features(torch.randn(min(8192, hi - lo - s), d, generator=g))
        labels = torch.randint(0, args["classes"], (hi - lo,), generator=g)
        queries = prepare_features(torch.randn(qhi - qlo, d, generator=g))
        train = KnnShard(shard.to(device), labels.to(device), lo, n)
        queries = queries.to(device)
        # one-time library set-up (BLAS buffers, kernel caches) is not part of the kNN's working set
        knn_predict(queries[:2], KnnShard(train.features[:8], train.labels[:8], 0, 8), [1], 0.07, args["classes"])
        dist.barrier()
        meter.reset()  # baseline: the shard and the queries are held
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_cuda = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        preds = knn_predict(queries, train, [20, args["k"]], 0.07, args["classes"], args["chunk"], args["block"],
                            sharded=world > 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = meter.peak_above_baseline()
        out = {"rank": rank, "seconds": seconds, "knn_peak_rss": peak, "shard_bytes": train.nbytes,
               "query_bytes": queries.numel() * 2, "predictions": int(preds[args["k"]].numel()),
               "working_set_bound": chunk_working_set_bytes(d, min(args["chunk"], q), min(args["block"], hi - lo),
                                                            args["k"], world, args["classes"])}
        if device.type == "cuda":
            out["cuda_peak_above_baseline"] = torch.cuda.max_memory_allocated(device) - base_cuda
        queue.put(("ok", out))
    except BaseException as e:  # report to the parent instead of hanging it
        queue.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a table (and JSON with ``--out``)."""
    import torch.multiprocessing as mp

    from largessl.distributed.env import free_port

    if not 0 < args.fraction <= 1 or args.ranks < 1:
        raise ValueError("--fraction must be in (0, 1] and --ranks >= 1")
    n = max(args.ranks, round(args.train * args.fraction))
    q = max(args.ranks, round(args.queries * args.fraction))
    cfg = {"n": n, "q": q, "dim": args.dim, "classes": args.classes, "k": args.k, "chunk": args.chunk,
           "block": args.block, "threads": args.threads, "device": args.device}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.ranks, port, cfg, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=24 * 3600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        raise RuntimeError("kNN benchmark failed: " + "; ".join(errors))
    ranks = sorted((r[1] for r in results), key=lambda r: r["rank"])
    seconds = max(r["seconds"] for r in ranks)
    scale = 1.0 / args.fraction
    full_shard = args.train * args.dim * 2 / args.ranks
    working = max(r["knn_peak_rss"] for r in ranks)
    summary = {
        "measured": {"train": n, "queries": q, "dim": args.dim, "k": args.k, "ranks": args.ranks,
                     "threads_per_rank": args.threads, "chunk": args.chunk, "block": args.block,
                     "device": args.device, "seconds": seconds, "per_rank": ranks},
        "extrapolated_full": {"train": args.train, "queries": args.queries,
                              "seconds_upper_bound": seconds * scale * scale,
                              "hours_upper_bound": seconds * scale * scale / 3600,
                              "peak_bytes_per_rank": full_shard + args.queries * args.dim * 2 / args.ranks + working,
                              "shard_bytes_per_rank": full_shard, "working_set_bytes": working},
        "method": "time x (1/fraction)^2 (scoring ~ queries x train rows); memory = full shard + measured "
                  "working set (independent of the row counts)",
    }
    mb = 1e6
    print(f"kNN at {args.fraction:g} of ImageNet shape: {n} x {args.dim} train, {q} queries, k={args.k}, "
          f"{args.ranks} {args.device} rank(s) x {args.threads} thread(s), chunk {args.chunk}, block {args.block}")
    for r in ranks:
        print(f"  rank {r['rank']}: {r['seconds']:.1f} s; holds shard {r['shard_bytes'] / mb:.0f} MB + queries "
              f"{r['query_bytes'] / mb:.1f} MB; kNN peak RSS on top {r['knn_peak_rss'] / mb:.0f} MB "
              f"(working-set bound {r['working_set_bound'] / mb:.0f} MB)")
    full = summary["extrapolated_full"]
    print(f"full ImageNet shape ({args.train} x {args.dim}, {args.queries} queries): <= {full['hours_upper_bound']:.2f} h, "
          f"peak ~{full['peak_bytes_per_rank'] / 1e9:.2f} GB per rank (shard {full['shard_bytes_per_rank'] / 1e9:.2f} GB "
          f"+ working set {working / mb:.0f} MB)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
