"""How fast is the store itself? Reads, lookups, open and writes against their peers.

Every actstore number is measured against a peer in the same run, on the same
bytes, interleaved round by round (the machine is shared and noisy), and the
tables give the ratio ``actstore ÷ peer`` as a speed (higher is better for
actstore) next to the target and PASS/FAIL.

Data: ``--rows`` rows × 384 float16 (random bits, finite, seed 0); the key of row ``i``
is ``actstore.format.keys.keys([str(i)])`` (BLAKE3 of the row index as text, through
the package's type-tagged encoding), or ``blake3(str(i).encode())`` when
``actstore.format.keys`` is missing.

Peers:

1. random gather of 256 rows — numpy fancy indexing on ``np.load(mmap_mode="r")``
   of the same array saved with ``np.save``; Hugging Face ``datasets`` (one Arrow
   file, memory-mapped, ``with_format("torch")``); zarr-python ``oindex`` on the
   store's own shard array;
2. single rows — ``torch.from_numpy(mm[i])`` on that numpy memory map;
3. open — ``np.load(mmap_mode="r")`` of the matching ``.npy`` (the target is absolute);
4. lookup — a Python dict ``{key bytes: row}`` built in memory (the target is absolute);
5. append + commit — ``ndarray.tofile`` of the same bytes followed by ``os.fsync``;
6. cold gather — the same numpy gather after both files are dropped from the page cache.

Run::

    python benchmarks/bench_store.py                      # 1M rows, ~1 GB write test
    python benchmarks/bench_store.py --quick              # 100k rows, 100 MB, fewer repeats
    python benchmarks/bench_store.py --results benchmarks/results/store.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import itertools
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actstore  # noqa: E402
from actstore.format.layout import FIELDS_DIR, SEGMENTS_DIR
from benchmarks.common import back_free_pages, drop_page_cache, huge_page_share, machine, timeit  # noqa: E402
from benchmarks.store_common import (  # noqa: E402
    APPEND_BATCH,
    BATCH,
    DIM,
    DTYPE,
    ROW_BYTES,
    SEED,
    SEGMENTS,
    SMALL_ROWS,
    Report,
    bench_many_commits,
    fmt_ratio,
    make_keys,
    make_rows,
    package_keys,
    race,
    step,
    use_cpu_clock,
)

#: The tables, in the order they run (``--only``).
TABLES = ("cold", "gather", "single", "open", "lookup", "append", "compressed", "commits")

# --- setup -------------------------------------------------------------------------


class Data:
    """Everything the benchmarks read: the array, its keys, the store and its peers on disk."""

    def __init__(self, out: str, rows: int) -> None:
        self.out = out
        self.rows = rows
        done = step(f"generating {rows:,} rows × {DIM} float16 and their keys")
        self.array = make_rows(rows, SEED)
        self.keys = make_keys(0, rows)
        done()
        self.npy = os.path.join(out, "data.npy")
        self.small_npy = os.path.join(out, "small.npy")
        self.store1 = os.path.join(out, "store-1seg")
        self.store20 = os.path.join(out, f"store-{SEGMENTS}seg")
        self.small = os.path.join(out, "store-small")
        self.hf_dir = os.path.join(out, "hf")
        self.meta = {"rows": rows, "dim": DIM, "dtype": "float16", "seed": SEED, "generator": "bits-v1",
                     "keys": "actstore.format.keys" if package_keys is not None else "blake3(str(i))"}

    def _cached(self, name: str) -> bool:
        """True if ``name`` in --out was built from the same data by an earlier run."""
        try:
            with open(os.path.join(self.out, name + ".meta.json")) as f:
                return json.load(f) == self.meta
        except (OSError, ValueError):
            return False

    def _mark(self, name: str) -> None:
        with open(os.path.join(self.out, name + ".meta.json"), "w") as f:
            json.dump(self.meta, f)

    def build(self) -> dict[str, float]:
        """Write every copy; returns the seconds each store took (for the log)."""
        took: dict[str, float] = {}
        if not self._cached("data.npy"):
            done = step("np.save")
            np.save(self.npy, self.array)
            self._mark("data.npy")
            done()
        np.save(self.small_npy, self.array[:SMALL_ROWS])
        for path in (self.store1, self.store20, self.small):
            shutil.rmtree(path, ignore_errors=True)
        done = step("actstore, one commit")
        t0 = time.perf_counter()
        self._write_store(self.store1, self.rows, 1)
        took["store1"] = time.perf_counter() - t0
        done()
        done = step(f"actstore, {SEGMENTS} commits")
        self._write_store(self.store20, self.rows, SEGMENTS)
        done()
        self._write_store(self.small, SMALL_ROWS, 1)
        if not self._cached("hf"):
            done = step("Hugging Face datasets Arrow file")
            self._write_arrow()
            self._mark("hf")
            done()
        return took

    def _write_store(self, path: str, rows: int, commits: int) -> None:
        per = -(-rows // commits)
        with actstore.create(path, {"h": actstore.Field((DIM,), "float16")}) as s:
            for c in range(commits):
                lo, hi = c * per, min(rows, (c + 1) * per)
                for i in range(lo, hi, 65536):
                    j = min(hi, i + 65536)
                    s.append(self.keys[i:j], {"h": self.array[i:j]})
                s.commit()

    def _write_arrow(self) -> None:
        """One Arrow stream file (what ``datasets`` memory-maps), fixed-size lists of float16."""
        import pyarrow as pa

        shutil.rmtree(self.hf_dir, ignore_errors=True)
        os.makedirs(self.hf_dir)
        schema = pa.schema([("h", pa.list_(pa.float16(), DIM))])
        with open(os.path.join(self.hf_dir, "data.arrow"), "wb") as f, pa.ipc.new_stream(f, schema) as w:
            for i in range(0, self.rows, 65536):
                block = self.array[i : i + 65536]
                col = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM)
                w.write_batch(pa.record_batch([col], schema=schema))

    def hf_dataset(self) -> Any:
        import datasets

        datasets.disable_progress_bars()
        return datasets.Dataset.from_file(os.path.join(self.hf_dir, "data.arrow")).with_format("torch")

    def zarr_array(self, store: actstore.ActivationStore) -> Any:
        import zarr

        seg = store.manifest.segments[0].id
        return zarr.open_array(os.path.join(store.path, SEGMENTS_DIR, seg, FIELDS_DIR, "h"), mode="r")


def warm(store: actstore.ActivationStore, mm: np.ndarray) -> None:
    """Fault in every page of both maps, the same way, so the gathers measure warm reads."""
    n = len(store)
    for i in range(0, n, 65536):
        rows = np.arange(i, min(n, i + 65536))
        store.gather(rows)
        np.asarray(mm[i : i + 65536]).copy()


# --- the benchmarks ----------------------------------------------------------------


def bench_cold(rep: Report, d: Data, rounds: int) -> None:
    """Gather after dropping the page cache of both files; each round opens fresh maps."""
    t = rep.table("Cold-cache random gather (page cache dropped before each call)")
    rng = np.random.default_rng(11)
    ours, peer = [], []
    gc.collect()
    for _ in range(rounds):
        idx = rng.choice(d.rows, BATCH, replace=False).astype(np.int64)
        drop_page_cache([d.store1, d.npy])
        s = actstore.open(d.store1)
        t0 = time.perf_counter()
        s.gather(idx)
        ours.append(time.perf_counter() - t0)
        del s
        gc.collect()
        drop_page_cache([d.store1, d.npy])
        mm = np.load(d.npy, mmap_mode="r")
        t0 = time.perf_counter()
        torch.from_numpy(mm[idx])
        peer.append(time.perf_counter() - t0)
        del mm
        gc.collect()
    o, p = BATCH / statistics.median(ours), BATCH / statistics.median(peer)
    rep.row(t, f"gather {BATCH} random rows, cold, vs numpy on a cold np.load mmap", o, p, "rows/s",
            higher_is_better=True, target="≥ 0.8×", passed=o / p >= 0.8)
    rep.note(t, f"median of {rounds} calls each, fresh map every call; {1e3 / o:.2f} ms a row for actstore, "
                f"{1e3 / p:.2f} ms for numpy: both wait on the disk's random-read latency (warm: ~0.2 µs a row)")


def bench_gather(rep: Report, d: Data, s1: actstore.ActivationStore, s20: actstore.ActivationStore,
                 mm: np.ndarray, rounds: int, quick: bool) -> None:
    t = rep.table(f"Random batch gather ({BATCH} random rows of {d.rows:,} × {DIM} float16, warm page cache)")
    rng = np.random.default_rng(1)
    names = ("one", "twenty", "numpy", "take", "hf", "zarr")
    # Each method its own 64 random batches (drawn alike): a method that ran right after another on the same rows
    # would find them in the CPU caches.
    batches = {k: [rng.choice(d.rows, BATCH, replace=False).astype(np.int64) for _ in range(64)] for k in names}
    mm = mm.view(np.ndarray)  # the same map without np.memmap's subclass, whose indexing is ~25% slower: the strongest peer
    lists = [b.tolist() for b in batches["hf"]]
    hf = d.hf_dataset()
    z = d.zarr_array(s1)
    cyc = {k: itertools.cycle(range(64)) for k in names}
    # (written out per method, not through ``check`` below: one Python frame a call, as each peer's own loop has)
    fns = {
        "one": lambda: s1.gather(batches["one"][next(cyc["one"])])["h"],
        "twenty": lambda: s20.gather(batches["twenty"][next(cyc["twenty"])])["h"],
        "numpy": lambda: torch.from_numpy(mm[batches["numpy"][next(cyc["numpy"])]]),
        "take": lambda: torch.from_numpy(np.take(mm, batches["take"][next(cyc["take"])], axis=0)),
        "hf": lambda: hf[lists[next(cyc["hf"])]]["h"],
        "zarr": lambda: torch.from_numpy(z.oindex[batches["zarr"][next(cyc["zarr"])]]),
    }
    # Same answers first (datasets' torch format returns float32: compare as float16).
    check = {"one": lambda b: s1.gather(b)["h"], "twenty": lambda b: s20.gather(b)["h"],
             "numpy": lambda b: torch.from_numpy(mm[b]), "take": lambda b: torch.from_numpy(np.take(mm, b, axis=0)),
             "hf": lambda b: hf[b.tolist()]["h"], "zarr": lambda b: torch.from_numpy(z.oindex[b])}
    probe = batches["one"][0]
    want = torch.from_numpy(mm[probe])
    for name, fn in check.items():
        if not torch.equal(fn(probe).to(torch.float16), want):
            raise SystemExit(f"{name}: gather returned other rows than numpy")
    numbers = {"one": 1000, "twenty": 1000, "numpy": 1000, "take": 1000, "hf": 5, "zarr": 1}  # (~20 ms a round each)
    if quick:
        numbers = {k: max(1, v // 4) for k, v in numbers.items()}
    done = step("gather race")
    # The fast methods race each other; datasets and zarr read hundreds of MB a call (evicting the CPU caches for
    # whoever runs next), so they race the 1-segment store on their own.
    fast = ("one", "twenty", "numpy", "take")
    sec = race({k: fns[k] for k in fast}, numbers, rounds)
    slow = race({k: fns[k] for k in ("one", "hf", "zarr")}, numbers, rounds)
    sec.update(hf=slow["hf"], zarr=slow["zarr"], one_slow=slow["one"])
    done()
    rps = {k: BATCH / v for k, v in sec.items()}
    np_peer = "numpy fancy indexing mm[rows] on the np.load map (as a plain ndarray) + torch.from_numpy"
    rep.row(t, f"1 segment vs {np_peer}", rps["one"], rps["numpy"], "rows/s",
            higher_is_better=True, target="≥ 0.8×", passed=rps["one"] / rps["numpy"] >= 0.8)
    rep.row(t, "1 segment vs np.take(mm, rows, axis=0) into a fresh array (numpy's fastest gather: the limit)",
            rps["one"], rps["take"], "rows/s", higher_is_better=True, target="≥ 0.9×",
            passed=rps["one"] / rps["take"] >= 0.9)
    # The target is for a store as one writer commits it (1 segment); many commits are reported.
    rep.row(t, f"{SEGMENTS} segments vs {np_peer}", rps["twenty"], rps["numpy"], "rows/s",
            higher_is_better=True, target="(report; ≥ 0.8× is for 1 segment)", passed=None)
    rep.row(t, "1 segment vs HF datasets, with_format('torch'), ds[list of 256]", rps["one_slow"], rps["hf"],
            "rows/s", higher_is_better=True, target="≥ 20×", passed=rps["one_slow"] / rps["hf"] >= 20)
    rep.row(t, "1 segment vs zarr-python oindex (unsorted) on the same shard array", rps["one_slow"], rps["zarr"],
            "rows/s", higher_is_better=True, target="≥ 1000×", passed=rps["one_slow"] / rps["zarr"] >= 1000)
    rep.note(t, f"median over {rounds} interleaved rounds of {numbers['one']} calls (datasets {numbers['hf']}, "
                f"zarr {numbers['zarr']}); each method takes the next of its own 64 fixed random batches (no repeats in a "
                f"batch); datasets and zarr race the 1-segment store in a race of their own (their rows use its "
                f"speed there)")
    rep.note(t, f"{SEGMENTS}-segment store ÷ 1-segment store: {fmt_ratio(rps['twenty'] / rps['one'])}")
    rep.note(t, "HF datasets' torch format returns float32 (it casts float16); the others return float16")
    shares = {name: huge_page_share(path) for name, path in (("1-segment store", s1.path), ("np.load map", d.npy))}
    rep.note(t, "resident pages mapped by 2 MiB huge pages (FilePmdMapped ÷ Rss; a random read of a map in small "
                "pages misses the TLB): " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.0%}'}"
                                                      for k, v in shares.items()))


def bench_single(rep: Report, d: Data, s1: actstore.ActivationStore, s20: actstore.ActivationStore,
                 mm: np.ndarray, rounds: int) -> None:
    t = rep.table("Single rows (loop over 10,000 random rows, views, no copy)")
    rows = np.random.default_rng(2).integers(0, d.rows, 10_000).tolist()
    memmap, mm = mm, mm.view(np.ndarray)  # np.load's np.memmap, and the plain array of the same map (the strongest)

    def ours(s: actstore.ActivationStore) -> Callable[[], None]:
        def run() -> None:
            for i in rows:
                s[i]
        return run

    def peer() -> None:
        for i in rows:
            torch.from_numpy(mm[i])

    def peer_memmap() -> None:
        for i in rows:
            torch.from_numpy(memmap[i])

    ds = actstore.ActivationDataset(s1)

    def dataset() -> None:
        for i in rows:
            ds[i]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns (once) that np.load's read-only map is not writable
        sec = race({"one": ours(s1), "twenty": ours(s20), "numpy": peer, "memmap": peer_memmap, "dataset": dataset},
                   {"one": 1, "twenty": 1, "numpy": 1, "memmap": 1, "dataset": 1}, rounds)
    rps = {k: len(rows) / v for k, v in sec.items()}
    peer_name = "loop of torch.from_numpy(mm[i]) on the np.load map (as a plain ndarray)"
    rep.row(t, f"store[i], 1 segment vs {peer_name}", rps["one"], rps["numpy"], "rows/s",
            higher_is_better=True, target="≥ 0.8×", passed=rps["one"] / rps["numpy"] >= 0.8)
    rep.row(t, "store[i], 1 segment vs the same loop on np.load's np.memmap (what np.load returns)", rps["one"],
            rps["memmap"], "rows/s", higher_is_better=True, target="(report)", passed=None)
    rep.row(t, f"ActivationDataset(store)[i], 1 segment vs {peer_name}", rps["dataset"], rps["numpy"], "rows/s",
            higher_is_better=True, target="≥ 0.8× (as store[i])", passed=rps["dataset"] / rps["numpy"] >= 0.8)
    rep.row(t, f"store[i], {SEGMENTS} segments vs {peer_name}", rps["twenty"], rps["numpy"], "rows/s",
            higher_is_better=True, target="≥ 0.5×", passed=rps["twenty"] / rps["numpy"] >= 0.5)
    rep.note(t, f"median over {rounds} interleaved rounds; store[i] returns a dict {{'h': tensor}}, the peer a bare tensor")


def bench_open(rep: Report, d: Data, repeat: int) -> None:
    t = rep.table("Open (median of calls; actstore.open + close, peer np.load(mmap_mode='r'))")
    def open_close(path: str) -> Callable[[], None]:
        return lambda: actstore.open(path).close()

    res = {}
    for name, path in (("big", d.store1), ("twenty", d.store20), ("small", d.small)):
        res[name] = timeit(open_close(path), repeat=repeat, warmup=2)
    big_np = timeit(lambda: np.load(d.npy, mmap_mode="r"), repeat=repeat, warmup=2)
    small_np = timeit(lambda: np.load(d.small_npy, mmap_mode="r"), repeat=repeat, warmup=2)
    idx = np.random.default_rng(3).choice(d.rows, BATCH, replace=False)
    first = timeit(lambda: actstore.open(d.store1).gather(idx), repeat=repeat, warmup=2)
    first_np = timeit(lambda: torch.from_numpy(np.load(d.npy, mmap_mode="r")[idx]), repeat=repeat, warmup=2)
    ms = 1e3
    rep.row(t, f"open {d.rows:,}-row store (1 segment)", res["big"] * ms, big_np * ms, "ms",
            higher_is_better=False, target="< 50 ms", passed=res["big"] < 0.05)
    rep.row(t, f"open {d.rows:,}-row store ({SEGMENTS} segments)", res["twenty"] * ms, big_np * ms, "ms",
            higher_is_better=False, target="< 50 ms", passed=res["twenty"] < 0.05)
    rep.row(t, f"open {SMALL_ROWS:,}-row store", res["small"] * ms, small_np * ms, "ms",
            higher_is_better=False, target="< 50 ms", passed=res["small"] < 0.05)
    rep.row(t, f"open {d.rows:,}-row store + first gather of {BATCH} rows", first * ms, first_np * ms, "ms",
            higher_is_better=False, target="< 50 ms", passed=first < 0.05)
    rep.note(t, f"{d.rows:,} rows ÷ {SMALL_ROWS:,} rows open time: {res['big'] / res['small']:.2f}× "
                f"(independent of rows ≈ 1×); median of {repeat} calls")


def bench_lookup(rep: Report, d: Data, s1: actstore.ActivationStore, s20: actstore.ActivationStore,
                 rounds: int) -> None:
    t = rep.table("Lookup (100,000 keys, half present, half absent)")
    n = 100_000 if d.rows >= 50_000 else 2 * (d.rows // 2)
    rng = np.random.default_rng(4)
    present = rng.choice(d.rows, n // 2, replace=False)
    query = np.concatenate([d.keys[present], make_keys(d.rows, d.rows + n // 2)])
    order = rng.permutation(n)
    query = np.ascontiguousarray(query[order])
    want = np.concatenate([present, np.full(n // 2, -1)])[order]
    qlist = [bytes(k) for k in query]
    done = step("dict of keys for the lookup peer")
    peer_map = {bytes(k): i for i, k in enumerate(d.keys)}
    done()
    fns: dict[str, Callable[[], Any]] = {
        "one": lambda: s1.lookup(query),
        "twenty": lambda: s20.lookup(query),
        "one_list": lambda: s1.lookup(qlist),
        "dict": lambda: [peer_map.get(k, -1) for k in qlist],
    }
    for name in ("one", "twenty", "one_list"):
        if not np.array_equal(fns[name](), want):
            raise SystemExit(f"lookup {name}: wrong rows")
    if fns["dict"]() != want.tolist():
        raise SystemExit("lookup peer: wrong rows")
    sec = race(fns, dict.fromkeys(fns, 3), rounds)
    kps = {k: n / v for k, v in sec.items()}
    runs20 = len(s20.manifest.indexes)
    for name, what in (("one", "(n, 32) uint8 array, 1 segment"),
                       ("twenty", f"(n, 32) uint8 array, {SEGMENTS} segments ({runs20} index runs)"),
                       ("one_list", "list of 32-byte bytes, 1 segment")):
        rep.row(t, f"store.lookup({what}) vs Python dict.get", kps[name], kps["dict"], "keys/s",
                higher_is_better=True, target="≥ 1,000,000 keys/s", passed=kps[name] >= 1e6)
    rep.note(t, "the target is absolute; the peer is an in-memory dict {key bytes: row} "
                f"({d.rows:,} entries, built outside the timing; the store needs no such build)")


def bench_append(rep: Report, d: Data, rows: int, rounds: int) -> None:
    gb = rows * ROW_BYTES / 1e9
    t = rep.table(f"Append + commit {gb:.2f} GB ({rows:,} rows × {DIM} float16, batches of {APPEND_BATCH})")
    done = step(f"generating {rows:,} rows and keys to write")
    data = make_rows(rows, SEED + 1)
    keys = make_keys(0, rows)
    done()
    store_path = os.path.join(d.out, "append-store")
    peer_path = os.path.join(d.out, "append-peer.bin")

    def ours() -> float:
        t0 = time.perf_counter()
        with actstore.create(store_path, {"h": actstore.Field((DIM,), "float16")}) as s:
            for i in range(0, rows, APPEND_BATCH):
                s.append(keys[i : i + APPEND_BATCH], {"h": data[i : i + APPEND_BATCH]})
            s.commit()
        return time.perf_counter() - t0

    def peer() -> float:
        t0 = time.perf_counter()
        with open(peer_path, "wb") as f:
            data.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0

    def clean() -> None:
        shutil.rmtree(store_path, ignore_errors=True)
        if os.path.exists(peer_path):
            os.unlink(peer_path)
        os.sync()  # nothing of one write left for the other to flush

    times: dict[str, list[float]] = {"ours": [], "peer": []}
    clean()
    for r in range(rounds):
        for name, fn in (("peer", peer), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("peer", peer)):
            back_free_pages(int(1.5 * data.nbytes))  # (pages the host backs for both: see common.back_free_pages)
            times[name].append(fn())
            clean()
    o = gb / statistics.median(times["ours"])
    p = gb / statistics.median(times["peer"])
    rep.row(t, "create + append + commit vs ndarray.tofile + os.fsync (peer also fsyncs)", o, p, "GB/s",
            higher_is_better=True, target="≥ 0.8×", passed=o / p >= 0.8)
    rep.note(t, f"median of {rounds} alternating rounds, data and keys generated before timing; GB/s counts the "
                f"{gb:.2f} GB of activations only — actstore also writes 32-byte keys per row, a key index and "
                "metadata, and hashes every byte (BLAKE3), all fsynced before commit returns")
    rep.note(t, "before each timed write, 1.5× its bytes of anonymous memory are touched and freed, so that both "
                "write into pages the host of a virtual machine backs (common.back_free_pages)")
    rep.note(t, "times (s): actstore " + ", ".join(f"{x:.2f}" for x in times["ours"])
                + "; peer " + ", ".join(f"{x:.2f}" for x in times["peer"]))


def bench_compressed(rep: Report, out: str, rows: int, rounds: int) -> None:
    """A zstd field against the same rows raw: size, write and read speed (no targets: a trade-off)."""
    t = rep.table(f"Compressed field (zstd level 3) vs raw ({rows:,} rows × {DIM} float16, standard normal)")
    done = step(f"writing {rows:,} rows raw and zstd-compressed")
    data = np.random.default_rng(SEED + 2).standard_normal((rows, DIM), dtype=np.float32).astype(DTYPE)
    keys = make_keys(0, rows)
    paths, write_s = {}, {}
    for comp in (None, "zstd"):
        paths[comp] = os.path.join(out, f"compressed-{comp}")
        shutil.rmtree(paths[comp], ignore_errors=True)
        t0 = time.perf_counter()
        with actstore.create(paths[comp], {"h": actstore.Field((DIM,), "float16", compression=comp)}) as s:
            for i in range(0, rows, APPEND_BATCH):
                s.append(keys[i : i + APPEND_BATCH], {"h": data[i : i + APPEND_BATCH]})
        write_s[comp] = time.perf_counter() - t0
    done()
    raw, comp = actstore.open(paths[None]), actstore.open(paths["zstd"])
    size = {k: float(actstore.open(p).info()["bytes_on_disk"]) for k, p in paths.items()}
    rep.row(t, "bytes on disk, zstd vs raw", size["zstd"] / 1e6, size[None] / 1e6, "MB", higher_is_better=False,
            target="(smaller)", passed=None)
    gb = rows * ROW_BYTES / 1e9
    rep.row(t, "create + append + commit, zstd vs raw", gb / write_s["zstd"], gb / write_s[None], "GB/s",
            higher_is_better=True, target="(report)", passed=None)
    rng = np.random.default_rng(SEED + 3)
    batches = [rng.choice(rows, BATCH, replace=False) for _ in range(16)]
    cyc = {k: itertools.cycle(batches) for k in ("raw", "zstd")}
    per = race({"raw": lambda: raw.gather(next(cyc["raw"])), "zstd": lambda: comp.gather(next(cyc["zstd"]))},
               {"raw": 50, "zstd": 5}, rounds)
    rep.row(t, f"random gather of {BATCH} rows, zstd vs raw (warm)", BATCH / per["zstd"], BATCH / per["raw"],
            "rows/s", higher_is_better=True, target="(report)", passed=None)
    seq = {k: itertools.cycle(range(0, rows - BATCH, BATCH)) for k in ("raw", "zstd")}
    per = race({"raw": lambda: raw.gather(np.arange(a := next(seq["raw"]), a + BATCH)),
                "zstd": lambda: comp.gather(np.arange(a := next(seq["zstd"]), a + BATCH))},
               {"raw": 200, "zstd": 200}, rounds)
    rep.row(t, f"in-order batches of {BATCH} rows, zstd vs raw (warm)", BATCH / per["zstd"],
            BATCH / per["raw"], "rows/s", higher_is_better=True, target="(report)", passed=None)
    rep.note(t, "no targets: compression is a trade of read speed for disk space. Random float16 activations "
                "compress little (their mantissas are noise); reads of a compressed field decode whole inner "
                f"chunks ({actstore.open(paths['zstd']).manifest.chunk_bytes // 1024} KiB), so random access "
                "decodes one chunk per row and in-order reads decode each chunk once; a compressed store meant for random "
                "access wants a smaller chunk_bytes")
    rep.note(t, f"write times (s): raw {write_s[None]:.2f}, zstd {write_s['zstd']:.2f} (one run each)")
    # Rows after a ReLU (about half exact zeros), as CNN features are.
    relu = np.maximum(data, 0)
    for comp in (None, "zstd"):
        shutil.rmtree(paths[comp], ignore_errors=True)
        with actstore.create(paths[comp], {"h": actstore.Field((DIM,), "float16", compression=comp)}) as s:
            for i in range(0, rows, APPEND_BATCH):
                s.append(keys[i : i + APPEND_BATCH], {"h": relu[i : i + APPEND_BATCH]})
        size[comp] = float(actstore.open(paths[comp]).info()["bytes_on_disk"])
    rep.row(t, "bytes on disk, zstd vs raw, rows after a ReLU (half zeros)", size["zstd"] / 1e6, size[None] / 1e6,
            "MB", higher_is_better=False, target="(smaller)", passed=None)
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)


# --- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows of the read benchmarks (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 rows, a 100 MB write, fewer repeats")
    ap.add_argument("--out", help="where stores and peers are written (default: a temp dir under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep --out afterwards (the Arrow peer is reused next run)")
    ap.add_argument("--results", help="also write the Markdown tables here (and the JSON next to it)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache gather")
    ap.add_argument("--only", choices=TABLES, action="append",
                    help="run only these tables (repeatable; default: all): " + ", ".join(TABLES))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time the interleaved races by wall time (default) or by this thread's CPU time (a loaded "
                         "machine: descheduling does not count)")
    ap.add_argument("--many-rows", type=int, default=None,
                    help="rows of the 64-commit stores (default 500,000; --quick 50,000)")
    args = ap.parse_args(argv)

    only = set(args.only or TABLES)
    if args.clock == "cpu":
        use_cpu_clock()
    rows = args.rows if args.rows is not None else (100_000 if args.quick else 1_000_000)
    append_rows = 130_000 if args.quick else 1_400_000
    rounds = 3 if args.quick else 7
    if rows < 2 * SMALL_ROWS:
        ap.error(f"--rows: at least {2 * SMALL_ROWS}")
    out = os.path.abspath(args.out) if args.out else tempfile.mkdtemp(prefix="actstore-bench-", dir="/tmp")
    os.makedirs(out, exist_ok=True)
    need = (4 * rows + append_rows * 2) * ROW_BYTES
    free = shutil.disk_usage(out).free
    if free < need * 1.2:
        raise SystemExit(f"--out {out}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB")

    started = time.perf_counter()
    header = [
        "# actstore: store benchmarks",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- actstore {actstore.__version__}, numpy {np.__version__}, command: `python benchmarks/bench_store.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        f"- data: {rows:,} rows × {DIM} float16 (random, finite), keys: {'actstore.format.keys.keys' if package_keys is not None else 'blake3'}"
        " of str(row)",
        f"- clock of the interleaved races: {'this thread’s CPU time' if args.clock == 'cpu' else 'wall time'}",
        "- ratio = actstore speed ÷ peer speed (above 1: actstore is faster); every peer runs in the same process"
        " on the same bytes, interleaved with actstore",
    ]
    print("\n".join(header) + "\n", flush=True)
    rep = Report()
    try:
        reads = only & {"cold", "gather", "single", "open", "lookup"}
        d = Data(out, rows if reads else 0)  # (no rows to generate when only the write tables run)
        if reads:
            d.build()
        if "cold" in only and not args.no_cold:
            bench_cold(rep, d, rounds=3 if args.quick else 5)
            print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
        if only & {"gather", "single", "lookup"}:
            s1, s20 = actstore.open(d.store1), actstore.open(d.store20)
            mm = np.load(d.npy, mmap_mode="r")
            done = step("warming both maps")
            warm(s1, mm)
            warm(s20, mm)
            done()
            if "gather" in only:
                bench_gather(rep, d, s1, s20, mm, rounds, args.quick)
                print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
            if "single" in only:
                bench_single(rep, d, s1, s20, mm, rounds)
                print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
            if "lookup" in only:
                bench_lookup(rep, d, s1, s20, rounds)
                print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
            del s1, s20, mm
        if "open" in only:
            bench_open(rep, d, repeat=20)
            print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
        d.array = None  # type: ignore[assignment]  # free 0.8 GB before the write test
        gc.collect()
        if "append" in only:
            bench_append(rep, d, append_rows, rounds=2 if args.quick else 5)
            print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
        if "compressed" in only:
            bench_compressed(rep, out, 20_000 if args.quick else 200_000, rounds=3 if args.quick else 5)
            print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
        if "commits" in only:
            many = args.many_rows or (50_000 if args.quick else 500_000)
            bench_many_commits(rep, out, make_rows(many, SEED + 1), make_keys(0, many), rounds)
            print(rep.markdown_of(rep.tables[-1]) + "\n", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    runtime = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    footer = f"_runtime {runtime / 60:.1f} min, peak RSS {peak:.1f} GiB_"
    print(footer)
    if args.results:
        # The cold table is measured first but reported last (it is optional).
        cold = "cold" in only and not args.no_cold
        order = rep.tables[1:] + rep.tables[:1] if cold else rep.tables
        body = "\n\n".join(rep.markdown_of(t) for t in order)
        with open(args.results, "w") as f:
            f.write("\n".join(header) + "\n\n" + body + "\n\n" + footer + "\n")
        with open(os.path.splitext(args.results)[0] + ".json", "w") as f:
            json.dump({"header": header, "machine": machine(), "runtime_s": runtime, "rows": rows,
                       "results": rep.records, "notes": rep.notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
