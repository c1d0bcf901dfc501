"""How fast are content keys?  key()/keys() against raw BLAKE3 and memcpy.

Prints one table.  Every rate is the best of ``--repeat`` runs, and every
row is compared with a peer measured in the same process:

* short strings: ``key(s)`` per string and ``keys(list)``, against a bare
  ``blake3(s.encode()).digest()`` loop (the floor for one hash per string);
* a 100 MB float32 array (numpy, torch, and a strided view that must be
  copied once), against raw BLAKE3 over the same bytes (single-threaded and
  ``max_threads=AUTO``) and against ``np.ndarray.copy()`` (memcpy rate);
* a tokenised-text sample (dict of small int64 arrays) and fingerprint().

Targets (from the issue): short strings >= 200k keys/s; 100 MB array >= 1 GB/s.

Usage::

    python benchmarks/bench_keys.py            # full
    python benchmarks/bench_keys.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from blake3 import blake3

if __package__ in (None, ""):  # run as a script: make `actstore` importable
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from actstore.format.keys import fingerprint, key, keys


def best(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Best wall time (seconds) of each function over ``repeat`` rounds.

    Rounds are interleaved (every function once per round), so a load spike
    from another process hits the peers as much as the measured code.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer strings and repeats")
    parser.add_argument("--mb", type=int, default=100, help="array size in MB (default 100)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per case (best is kept)")
    args = parser.parse_args()
    n_str = 20_000 if args.quick else 200_000
    repeat = args.repeat or (3 if args.quick else 7)
    rows: list[tuple[str, float, str, str, str]] = []

    def row(case: str, rate: float, unit: str, peer: str = "", target: str = "") -> None:
        rows.append((case, rate, unit, peer, target))

    # --- short strings and a tokenised-text sample -----------------------------
    rng = np.random.default_rng(0)
    texts = [f"what is the refund policy for order {i}?" for i in range(n_str)]
    toks = [
        {"input_ids": rng.integers(0, 30000, 32), "attention_mask": np.ones(32, np.int64), "label": i % 5}
        for i in range(n_str // 10)
    ]
    t = best(
        {
            "key": lambda: [key(s) for s in texts],
            "keys": lambda: keys(texts),
            "raw": lambda: [blake3(s.encode()).digest() for s in texts],
            "tok": lambda: keys(toks),
        },
        repeat,
    )
    row("key(str), ~40 chars, per call", n_str / t["key"], "keys/s", f"{t['raw'] / t['key']:.2f}x raw", ">= 200k")
    row("keys(list of str)", n_str / t["keys"], "keys/s", f"{t['raw'] / t['keys']:.2f}x raw", ">= 200k")
    row("peer: blake3(s.encode()).digest()", n_str / t["raw"], "keys/s")
    row("keys(dict: 2 x int64[32], int)", len(toks) / t["tok"], "keys/s")

    # --- one large array ---------------------------------------------------------
    arr = rng.standard_normal(args.mb * 1_000_000 // 4, dtype=np.float32)
    flat = arr.view(np.uint8)
    tensor = torch.from_numpy(arr)
    strided = np.lib.stride_tricks.as_strided(  # every other float of a 2x buffer
        np.empty(arr.size * 2, np.float32), shape=(arr.size,), strides=(8,)
    )
    strided[:] = arr
    assert key(strided) == key(arr) == key(tensor)
    t = best(
        {
            "raw1": lambda: blake3(flat).digest(),
            "rawn": lambda: blake3(flat, max_threads=blake3.AUTO).digest(),
            "copy": lambda: arr.copy(),
            "arr": lambda: key(arr),
            "ten": lambda: key(tensor),
            "str": lambda: key(strided),
        },
        repeat,
    )
    gb, mb, raw = arr.nbytes / 1e9, f"{args.mb} MB", t["rawn"]
    row(f"key(float32 ndarray, {mb})", gb / t["arr"], "GB/s", f"{raw / t['arr']:.2f}x raw AUTO", ">= 1")
    row(f"key(float32 tensor, {mb})", gb / t["ten"], "GB/s", f"{raw / t['ten']:.2f}x raw AUTO", ">= 1")
    row(f"key(strided view, {mb}: 1 copy)", gb / t["str"], "GB/s", f"{raw / t['str']:.2f}x raw AUTO")
    row(f"peer: blake3 1 thread, {mb}", gb / t["raw1"], "GB/s", f"AUTO is {t['raw1'] / raw:.2f}x faster")
    row(f"peer: blake3 max_threads=AUTO, {mb}", gb / raw, "GB/s")
    row(f"peer: ndarray.copy(), {mb}", gb / t["copy"], "GB/s", f"key(ndarray) = {t['arr'] / t['copy']:.2f} copies")

    # --- fingerprint of a model of about the same size --------------------------
    width = 1024 if args.quick else 2048
    layers = max(1, args.mb * 1_000_000 // (4 * width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    t = best({"fp": lambda: fingerprint(model), "rawn": lambda: blake3(flat, max_threads=blake3.AUTO).digest()}, repeat)
    ratio = (model_gb / t["fp"]) / (gb / t["rawn"])
    row(f"fingerprint({layers} x Linear({width}, {width}))", model_gb / t["fp"], "GB/s", f"{ratio:.2f}x raw AUTO")

    mode = "quick" if args.quick else "full"
    print(f"actstore.hashing benchmark ({mode}; best of {repeat} interleaved rounds; {os.cpu_count()} CPUs)")
    print(f"{'case':<40} {'rate':>12} {'unit':<7} {'vs peer':<30} target")
    print("-" * 100)
    for case, rate, unit, peer, target in rows:
        shown = f"{rate:,.0f}" if unit == "keys/s" else f"{rate:.2f}"
        print(f"{case:<40} {shown:>12} {unit:<7} {peer:<30} {target}")


if __name__ == "__main__":
    main()
