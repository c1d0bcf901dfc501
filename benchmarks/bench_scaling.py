#!/usr/bin/env python
"""Scaling out: distributed precompute, and training from a store on object storage.

Two questions, each against a peer measured in the same run:

1. **Distributed precompute.**  ``torchrun --standalone --nproc-per-node 2`` (CPU,
   gloo) against one process, same compute-bound model (an MLP, about 21 MFLOP a
   sample), same data, ``torch.set_num_threads(1)`` in every process.  Runs are
   interleaved (1, 2, 1, 2 ...) and the best of each is kept.  Target ≥ 1.7×.
   Both stores are checked to hold the same keys and bit-identical values.
2. **Training from S3.**  A SeaweedFS server on loopback (tests/s3_server.py)
   holds a copy of a local store.  A training-style epoch — every row once, in
   random batches of 256, ``store.gather`` — from the S3 store with a warm local
   chunk cache against the same epoch from the local store (target ≤ 1.05×);
   the cold first epoch (files downloaded whole on first touch, or prefetched in
   the epoch's order) beside the server's raw GET throughput for the same files
   in this run; and, for scale, a few batches read through zarr-python with no
   cache (``cache_dir=False``).

Usage::

    python benchmarks/bench_scaling.py                      # both parts, ~3-5 minutes here
    python benchmarks/bench_scaling.py --quick              # smaller
    python benchmarks/bench_scaling.py --results benchmarks/results/scaling.md

Only 127.0.0.1 is contacted (SeaweedFS runs with telemetry off).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, ROOT)

from benchmarks.common import Table, machine  # noqa: E402

DIM, HIDDEN = 512, 2048


# --- part 1: the worker run by torchrun (or alone) ----------------------------------------------


class Vectors(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``n`` seeded random vectors, made on the fly (cheap next to the model)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(DIM, generator=torch.Generator().manual_seed(i))


def compute_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM)).eval()


def worker(out: str, n: int, batch: int, result: str) -> None:
    torch.set_num_threads(1)
    from actstore.precompute.api import precompute

    t0, c0 = time.perf_counter(), time.process_time()
    store = precompute(compute_model(), Vectors(n), out, batch_size=batch, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    rank = int(os.environ.get("RANK", 0))
    with open(f"{result}.{rank}", "w") as f:
        json.dump({"seconds": seconds, "cpu": cpu, "rows": len(store), "threads": torch.get_num_threads()}, f)


def run_precompute(procs: int, n: int, batch: int, work: str) -> dict[str, Any]:
    out = tempfile.mkdtemp(dir=work, prefix=f"p{procs}-")
    shutil.rmtree(out)
    result = out + ".json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    script = [os.path.abspath(__file__), "--worker", out, str(n), str(batch), result]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc-per-node={procs}", *script]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, timeout=1800, capture_output=True)
    wall = time.perf_counter() - t0
    ranks = []
    for rank in range(procs):
        with open(f"{result}.{rank}") as f:
            ranks.append(json.load(f))
    return {**ranks[0], "cpu_per_rank": [r["cpu"] for r in ranks], "wall": wall, "path": out}


def identical(a: str, b: str) -> bool:
    import actstore

    sa, sb = actstore.open(a), actstore.open(b)
    rows = np.arange(len(sa))
    other = sb.lookup(sa.key_at(rows))
    if len(sa) != len(sb) or (other < 0).any():
        return False
    return all(sa.gather(rows)[f].numpy().tobytes() == sb.gather(other)[f].numpy().tobytes() for f in sa.fields)


def bench_distributed(n: int, batch: int, repeats: int, work: str) -> tuple[Table, dict[str, Any]]:
    best: dict[int, dict[str, Any]] = {}
    for _ in range(repeats):
        for procs in (1, 2):
            r = run_precompute(procs, n, batch, work)
            if procs not in best or r["seconds"] < best[procs]["seconds"]:
                best[procs] = r
    one, two = best[1], best[2]
    t = Table(f"Distributed precompute: {n:,} samples, MLP {DIM}-{HIDDEN}x3-{DIM} (~21 MFLOP/sample), batch {batch}, "
              "1 thread per process (best of " + str(repeats) + ")",
              ["run", "processes", "precompute() s", "samples/s", "speedup", "CPU s per process",
               "wall incl. launch s", "speedup (wall)"])
    cpu = lambda r: " / ".join(f"{c:.2f}" for c in r["cpu_per_rank"])  # noqa: E731
    t.add("python (one process)", 1, one["seconds"], n / one["seconds"], 1.0, cpu(one), one["wall"], 1.0)
    t.add("torchrun --nproc-per-node 2", 2, two["seconds"], n / two["seconds"], one["seconds"] / two["seconds"],
          cpu(two), two["wall"], one["wall"] / two["wall"])
    same = identical(one["path"], two["path"])
    return t, {"identical": same, "speedup": one["seconds"] / two["seconds"]}


# --- part 2: training epochs from S3 ---------------------------------------------------------------


def epoch(store: Any, rows: int, seed: int, batch: int = 256, limit: int | None = None) -> tuple[float, int]:
    """Seconds for one epoch of random batches via gather, and the rows read."""
    order = np.random.default_rng(seed).permutation(rows)
    t0 = time.perf_counter()
    n = 0
    for b, a in enumerate(range(0, rows, batch)):
        if limit is not None and b >= limit:
            break
        idx = order[a : a + batch]
        store.gather(idx, "h")
        n += len(idx)
    return time.perf_counter() - t0, n


def bench_s3(rows: int, segments: int, work: str) -> tuple[list[Table], dict[str, Any]]:
    import actstore
    from actstore.storage.objects import ObjectStore
    from actstore.store import push
    from actstore.testing.s3_server import SeaweedS3

    width = 384
    row_bytes = width * 4
    local = os.path.join(work, "local.store")
    store = actstore.create(local, {"h": actstore.Field((width,), "float32"), "y": actstore.Field((), "int64")})
    rng = np.random.default_rng(0)
    per = rows // segments
    for s in range(segments):
        ids = np.arange(s * per, (s + 1) * per)
        store.append(actstore.keys([int(i) for i in ids]), {"h": rng.standard_normal((per, width), np.float32), "y": ids})
        store.commit()
    store.close()
    rows = per * segments
    data_bytes = rows * row_bytes
    out: dict[str, Any] = {}
    with SeaweedS3(os.path.join(work, "weed")) as server:
        os.environ.update(server.env)
        url = f"s3://{server.make_bucket()}/store"
        objects = ObjectStore(url)
        objects.exists("zarr.json")  # import s3fs and open the connection before timing
        t0 = time.perf_counter()
        push(local, url, cache_dir=os.path.join(work, "push-cache"))
        upload = time.perf_counter() - t0
        files = [f for f in objects.fs.find(objects.path("segments")) if "/fields/h/c/" in f]
        # raw PUT of the same data files (to another prefix), then raw GET, sequential and 4 at a time
        local_files = [os.path.join(local, "segments", f.split("/segments/", 1)[1]) for f in files]
        t0 = time.perf_counter()
        objects.fs.put(local_files, [f.replace("/store/", "/rawput/") for f in files], batch_size=4)
        raw_put = sum(os.path.getsize(f) for f in local_files) / (time.perf_counter() - t0)
        tmp = os.path.join(work, "raw")
        os.makedirs(tmp)
        t0 = time.perf_counter()
        for i, f in enumerate(files):
            objects.fs.get_file(f, os.path.join(tmp, str(i)))
        raw_seq = sum(os.path.getsize(os.path.join(tmp, str(i))) for i in range(len(files))) / (time.perf_counter() - t0)
        shutil.rmtree(tmp)
        os.makedirs(tmp)
        t0 = time.perf_counter()
        objects.fs.get(files, [os.path.join(tmp, str(i)) for i in range(len(files))], batch_size=4)
        raw_par = sum(os.path.getsize(os.path.join(tmp, str(i))) for i in range(len(files))) / (time.perf_counter() - t0)
        shutil.rmtree(tmp)

        loc = actstore.open(local)
        epoch(loc, rows, 99)  # warm the page cache
        cold = actstore.open(url, cache_dir=os.path.join(work, "cache-cold"))
        cold_s, _ = epoch(cold, rows, 0)
        pre = actstore.open(url, cache_dir=os.path.join(work, "cache-prefetch"))
        t0 = time.perf_counter()
        pre.prefetch(np.random.default_rng(0).permutation(rows), ["h"])
        pre_epoch, _ = epoch(pre, rows, 0)
        pre_s = time.perf_counter() - t0
        loc_s, warm_s = [], []
        for r in range(5):  # interleaved: local, S3 warm, local, ...
            loc_s.append(epoch(loc, rows, r + 1)[0])
            warm_s.append(epoch(cold, rows, r + 1)[0])
        lazy = actstore.open(url, cache_dir=False)
        lazy_s, lazy_rows = epoch(lazy, rows, 0, limit=8)
        out.update(upload=upload, raw_seq=raw_seq, raw_par=raw_par, raw_put=raw_put)
    best_loc, best_warm = min(loc_s), min(warm_s)
    mb = data_bytes / 1e6
    t1 = Table(f"Training epoch: {rows:,} rows x {row_bytes:,} B ({mb:,.0f} MB) in {segments} segments, random batches "
               "of 256 via gather (best of 5, interleaved)",
               ["source", "epoch s", "rows/s", "MB/s", "vs local"])
    t1.add("local store", best_loc, rows / best_loc, mb / best_loc, 1.0)
    t1.add("S3 store, warm chunk cache", best_warm, rows / best_warm, mb / best_warm, best_warm / best_loc)
    t1.add("S3 store, no cache (zarr-python, 8 batches)", lazy_s, lazy_rows / lazy_s, lazy_rows * row_bytes / 1e6 / lazy_s,
           (lazy_s / lazy_rows) / (best_loc / rows))
    t2 = Table("Cold first epoch from S3 vs the server's raw GET throughput (same files, same run)",
               ["what", "seconds", "MB/s of field data", "vs raw GET (sequential)"])
    t2.add("raw GET, one file at a time", mb / (out["raw_seq"] / 1e6), out["raw_seq"] / 1e6, 1.0)
    t2.add("raw GET, 4 concurrent", mb / (out["raw_par"] / 1e6), out["raw_par"] / 1e6, out["raw_par"] / out["raw_seq"])
    t2.add("cold epoch, files fetched on first touch", cold_s, mb / cold_s, (mb / cold_s) / (out["raw_seq"] / 1e6))
    t2.add("cold epoch, prefetch(epoch order) first", pre_s, mb / pre_s, (mb / pre_s) / (out["raw_seq"] / 1e6))
    t2.add("raw PUT, 4 concurrent", mb / (out["raw_put"] / 1e6), out["raw_put"] / 1e6, out["raw_put"] / out["raw_seq"])
    t2.add("upload (actstore push: create, adopt, one commit)", out["upload"], mb / out["upload"],
           (mb / out["upload"]) / (out["raw_seq"] / 1e6))
    out.update(warm_ratio=best_warm / best_loc, prefetch_epoch=pre_epoch)
    return [t1, t2], out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--samples", type=int, help="precompute samples (default 8000; quick 3000)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", type=int, help="S3 store rows (default 65536; quick 16384)")
    p.add_argument("--skip", choices=["distributed", "s3"], action="append", default=[])
    p.add_argument("--results", help="write the Markdown report here")
    args = p.parse_args()
    n = args.samples or (3000 if args.quick else 8000)
    rows = args.rows or (16384 if args.quick else 65536)
    lines = [f"Machine: {machine()}", f"Load average at start: {os.getloadavg()[0]:.1f} (1 min)", ""]
    work = tempfile.mkdtemp(prefix="actstore-bench-scaling-")
    try:
        if "distributed" not in args.skip:
            t, info = bench_distributed(n, 64, args.repeats, work)
            t.print()
            lines += [t.markdown(), "", f"Stores identical (keys, values bit for bit): {info['identical']}", ""]
            print(f"identical: {info['identical']}", flush=True)
        if "s3" not in args.skip:
            tables, info = bench_s3(rows, 8, work)
            for t in tables:
                t.print()
                lines += [t.markdown(), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append(f"Load average at end: {os.getloadavg()[0]:.1f} (1 min)")
    if args.results:
        with open(args.results, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
