"""What do the chunk cache's checks cost on a warm cache?  Checked (verified markers) against trusting sizes.

A remote store (SeaweedFS on loopback) of ``--rows`` rows × 384 float16 in 16
segments is read once into a cache.  Then, in interleaved rounds, a fresh
process opens the store over that warm cache and reads one epoch (every row,
256 random rows a gather), twice per round:

* **checked** — the default: each cached file is trusted through its verified
  marker (one ``stat`` and one small read per file and process);
* **size only** — the peer: the cache trusts any file of the right size (what
  it did before the markers; not a mode actstore offers).

Usage::

    python benchmarks/bench_cache_checks.py            # 100,000 rows, 5 rounds
    python benchmarks/bench_cache_checks.py --quick    # 20,000 rows, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):  # run as a script: make `actstore` importable
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import actstore
from actstore.testing.s3_server import SeaweedS3
from benchmarks.common import Table, machine

SEGMENTS, DIM = 16, 384

CHILD = r"""
import os, sys, time
import numpy as np
import actstore
import actstore.storage.chunkcache as cc
if sys.argv[4] == "size":  # the peer: trust any cached file of the right size
    cc.ChunkCache.trusted = lambda self, path, rec: cc._size(path) == rec["size"]
url, cache, opts = sys.argv[1], sys.argv[2], eval(sys.argv[3])
t0 = time.perf_counter()
s = actstore.open(url, cache_dir=cache, storage_options=opts)
order = np.random.default_rng(0).permutation(len(s))
for a in range(0, len(s), 256):
    s.gather(order[a:a + 256])
print(time.perf_counter() - t0)
"""


def epoch(url: str, cache: str, opts: dict[str, str], mode: str) -> float:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", CHILD, url, cache, repr(opts), mode], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = args.rows or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 5)
    work = tempfile.mkdtemp(prefix="actstore-bench-cache-")
    try:
        with SeaweedS3() as srv:
            url, opts = f"s3://{srv.make_bucket()}/store", srv.storage_options
            rng = np.random.default_rng(0)
            per = rows // SEGMENTS
            with actstore.create(url, {"h": actstore.Field((DIM,), "float16")}, cache_dir=os.path.join(work, "w"),
                                 storage_options=opts) as w:
                w.merge_policy = None
                for _ in range(SEGMENTS):
                    w.append(np.frombuffer(rng.bytes(32 * per), np.uint8).reshape(per, 32),
                             {"h": rng.standard_normal((per, DIM)).astype(np.float16)})
                    w.commit()
            cache = os.path.join(work, "r")
            first = epoch(url, cache, opts, "checked")  # downloads (each file checked once, its marker written)
            times: dict[str, list[float]] = {"checked": [], "size": []}
            for _ in range(rounds):
                for mode in times:
                    times[mode].append(epoch(url, cache, opts, mode))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    t = Table(f"Warm chunk cache: open + one epoch of {SEGMENTS * per:,} rows × {DIM} float16, {SEGMENTS} segments, "
              "a fresh process each", ["case", "seconds (median)", "peer: size only", "ratio (time)"])
    t.add("checked (verified markers)", med["checked"], med["size"], f"{med['checked'] / med['size']:.2f}×")
    t.add("cold: download, check, mark (first epoch)", first, "—", "—")
    t.print()
    print(f"{rounds} interleaved rounds; {machine()}")


if __name__ == "__main__":
    main()
