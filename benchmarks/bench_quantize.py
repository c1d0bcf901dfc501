"""Quantised fields against float16: disk, write, gather into float32, and the error they add.

    python -m benchmarks.bench_quantize                 # 1,000,000 rows x 384, ~2 min on 2 cores
    python -m benchmarks.bench_quantize --quick         # 100,000 rows
    python -m benchmarks.bench_quantize --results benchmarks/results/quantize.md

Three stores of the same rows (standard normal values, stored as float16, int8 and
float8_e4m3 with float16 as the read dtype), each written in one commit.  Gathers
take 256 random rows into float32 (what a training step asks for), the stores
taking turns round by round; the float16 store's gather is the peer of the
quantised ones, and ``np.take`` + a float32 cast on the float16 memory map is
shown as the limit of a float16 read.  Warm page cache: every file was just
written (on this machine the disk is backed by host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine
from benchmarks.store_common import BATCH, DIM, Report, make_keys, race, step

SCHEMES = ("int8", "float8_e4m3")


def build(path: str, keys: np.ndarray, x: np.ndarray, quantize: str | None) -> tuple[Any, float]:
    import actstore

    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    with actstore.create(path, {"h": actstore.Field((DIM,), "float16", quantize=quantize)}) as s:
        for a in range(0, len(x), 65536):
            s.append(keys[a : a + 65536], {"h": x[a : a + 65536]})
        s.commit()
    return actstore.open(path), time.perf_counter() - t0


def _field_bytes(root: str) -> int:
    """Bytes of every file of field ``h`` in the store's segments."""
    seg = os.path.join(root, "segments")
    return sum(os.path.getsize(os.path.join(d, f)) for sid in os.listdir(seg) if os.path.isdir(os.path.join(seg, sid))
               for d, _, fs in os.walk(os.path.join(seg, sid, "fields", "h")) for f in fs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="rows per store (default 1,000,000; quick 100,000)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="interleaved gather rounds (default 15; quick 5)")
    p.add_argument("--out", default=None, help="where the stores go (default: a temp dir, deleted)")
    p.add_argument("--results", default=None, help="write the Markdown here (and JSON next to it)")
    args = p.parse_args(argv)
    n = args.rows or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (5 if args.quick else 15)
    out = args.out or tempfile.mkdtemp(prefix="actstore-bench-quantize-")
    torch.set_num_threads(1)
    try:
        return run(n, rounds, out, args.results)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


def run(n: int, rounds: int, out: str, results: str | None) -> dict[str, Any]:
    done = step(f"making {n:,} rows x {DIM}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    keys = make_keys(0, n)
    done()
    stores: dict[str, Any] = {}
    write_s: dict[str, float] = {}
    for name in ("float16", *SCHEMES):
        done = step(f"writing the {name} store")
        stores[name], write_s[name] = build(os.path.join(out, name), keys, x, None if name == "float16" else name)
        done()
    size = {k: s.backend.size() for k, s in stores.items()}
    field_size = {k: _field_bytes(os.path.join(out, k)) for k in stores}
    mm = stores["float16"].snapshot.segments[0].fixed("h")  # the float16 store's own map (np.take's peer)
    batches = [rng.integers(0, n, BATCH) for _ in range(64)]
    it = {"i": 0}

    def ids() -> np.ndarray:
        it["i"] = (it["i"] + 1) % len(batches)
        return batches[it["i"]]

    def np_take() -> Any:
        return np.take(mm, ids(), axis=0).astype(np.float32)

    def gather_of(store: Any) -> Callable[[], Any]:
        return lambda: store.gather(ids(), "h", dtype=torch.float32)

    fns: dict[str, Callable[[], Any]] = {"np.take + cast": np_take}
    fns.update({k: gather_of(s) for k, s in stores.items()})
    per_call = race(fns, {k: 200 for k in fns}, rounds)
    rate = {k: BATCH / t for k, t in per_call.items()}

    rep = Report()
    t = rep.table(f"Quantised fields: {n:,} rows x {DIM}, read as float32 (256 random rows per gather)")
    f16 = size["float16"]
    for k in SCHEMES:  # (ratios of sizes: this store's bytes ÷ the float16 store's)
        rep.row(t, f"disk of the field (codes + scales), {k} vs float16", field_size[k] / 1e6,
                field_size["float16"] / 1e6, "MB", higher_is_better=True, target="≤ 0.52× float16" if k == "int8" else "",
                passed=field_size[k] <= 0.52 * field_size["float16"] if k == "int8" else None)
    for k in SCHEMES:
        rep.row(t, f"disk of the whole store (keys and key index too), {k} vs float16", size[k] / 1e6, f16 / 1e6,
                "MB", higher_is_better=True, target="", passed=None)
    for k in SCHEMES:
        rep.row(t, f"gather into float32, {k} vs float16", rate[k], rate["float16"], "rows/s", higher_is_better=True,
                target="≥ 0.8× float16" if k == "int8" else "", passed=rate[k] >= 0.8 * rate["float16"] if k == "int8"
                else None)
    rep.row(t, "gather into float32, float16 store vs np.take + cast (its limit)", rate["float16"],
            rate["np.take + cast"], "rows/s", higher_is_better=True, target="", passed=None)
    for k in SCHEMES:
        rep.row(t, f"write (append + commit), {k} vs float16", n / write_s[k], n / write_s["float16"], "rows/s",
                higher_is_better=True, target="", passed=None)
    # The error quantisation adds, on a sample of rows (against the float32 values; float16 storage for scale).
    sample = np.sort(rng.choice(n, min(n, 20_000), replace=False))
    want = torch.from_numpy(x[sample])
    errors: dict[str, dict[str, float]] = {}
    for k, s in stores.items():
        got = s.gather(sample, "h", dtype=torch.float32)["h"]
        rel = ((got - want).norm(dim=1) / want.norm(dim=1)).numpy()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=1).numpy()
        errors[k] = {"relative_l2_mean": float(rel.mean()), "relative_l2_max": float(rel.max()),
                     "cosine_min": float(cos.min())}
    for k, e in errors.items():
        rep.note(t, f"{k}: relative L2 error per row mean {e['relative_l2_mean']:.2e}, max "
                    f"{e['relative_l2_max']:.2e}; cosine to the float32 row at least {e['cosine_min']:.6f}")
    rep.note(t, f"Bytes per row: float16 {f16 / n:.1f}, int8 {size['int8'] / n:.1f}, float8_e4m3 "
                f"{size['float8_e4m3'] / n:.1f} (keys, 32 B, and the key index included).")
    rep.note(t, "Warm page cache (the stores were just written; this machine's disk is backed by host memory). "
                f"Median of {rounds} interleaved rounds of 200 gathers each; 1 torch thread.")
    rep.note(t, f"Machine: {machine()}.")
    md = rep.markdown_of(t)
    print(md)
    report = {"rows": n, "dim": DIM, "bytes": size, "field_bytes": field_size, "rows_per_s": rate, "write_s": write_s, "errors": errors,
              "records": rep.records, "machine": machine()}
    if results:
        os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
        with open(results, "w") as f:
            f.write(md + "\n\nCommand: `python -m benchmarks.bench_quantize" + (f" --rows {n}" if n != 1_000_000 else "")
                    + "`\n")
        with open(os.path.splitext(results)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1)
    for s in stores.values():
        s.close()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
