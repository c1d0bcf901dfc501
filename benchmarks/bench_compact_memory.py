#!/usr/bin/env python
"""How much of a store does ``compact()`` keep mapped in?  File-backed and anonymous peaks, sampled apart.

Builds a store of one large segment and a few small ones (the shape ``precompute`` leaves before its final
compaction: the tiered merge's big segment, then the last commits), then compacts it while a thread samples
``/proc/self/smaps_rollup``.  Target: file-backed peak under 256 MB whatever the store's size.  Also lists
the files most resident at the peak (from ``/proc/self/smaps``).

Usage::

    python benchmarks/bench_compact_memory.py --rows 3000000,100000,100000,100000 [--dir /tmp]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actstore  # noqa: E402
from benchmarks.bench_precompute import _rollup as rollup  # noqa: E402

DIM = 384


def resident_files(under: str) -> list[tuple[str, int]]:
    """The files under ``under`` most resident in this process's maps (kB)."""
    per: collections.Counter[str] = collections.Counter()
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:
                cur = parts[5] if len(parts) >= 6 and parts[5].startswith(under) else None
            elif cur and line.startswith("Rss:"):
                per[os.path.relpath(cur, under)] += int(parts[1])
    return per.most_common(3)


def build(path: str, sizes: list[int]) -> None:
    s = actstore.create(path, {"h": actstore.Field((DIM,), "float16")})
    s.merge_policy = None
    block = np.random.default_rng(0).standard_normal((100_000, DIM)).astype(np.float16)
    at = 0
    for size in sizes:
        for a in range(0, size, len(block)):
            m = min(len(block), size - a)
            s.append(actstore.keys(range(at, at + m)), {"h": block[:m]})
            at += m
        s.commit()
    s.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="3000000,100000,100000,100000", help="rows of each commit (one segment each)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    sizes = [int(x) for x in args.rows.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-compact-memory-", dir=args.dir)
    path = os.path.join(tmp, "store")
    try:
        build(path, sizes)
        store_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6
        s = actstore.open(path, mode="a")
        base = rollup()
        peak = {"anon": 0, "file": 0}
        files: list[tuple[str, int]] = []
        stop = threading.Event()

        def sample() -> None:
            nonlocal files
            while not stop.is_set():
                a, f = rollup()
                if f > peak["file"]:
                    peak["file"] = f
                    files = resident_files(path + os.sep)
                peak["anon"] = max(peak["anon"], a)
                stop.wait(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        report = s.compact()
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        s.close()
        print(f"store: {store_mb:,.0f} MB, segments of {', '.join(f'{n:,}' for n in sizes)} rows × {DIM} float16")
        print(f"{report}; {seconds:.1f} s; load average {os.getloadavg()[0]:.1f}")
        print(f"file-backed peak − baseline: {(peak['file'] - base[1]) / 1024:,.0f} MB (target < 256); "
              f"anonymous peak − baseline: {(peak['anon'] - base[0]) / 1024:,.0f} MB")
        print("most resident at the file-backed peak: "
              + ", ".join(f"{name} {kb / 1024:,.0f} MB" for name, kb in files))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
