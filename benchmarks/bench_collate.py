"""Default collate against ``actstore.collate``: does a plain ``DataLoader(ActivationDataset(p), batch_size=256)`` keep up?

A user who swaps an ``ActivationDataset`` into an existing loader gives it no
``collate_fn``: torch then calls ``default_collate`` on what ``__getitems__``
returns.  actstore registers its row types in ``default_collate_fn_map`` (the
documented extension point of ``default_collate``), so the default path gathers
the batch in one copy, as ``collate_fn=actstore.collate`` does.  This measures
one shuffled epoch both ways, in the same run, for a fixed field (float16 × 384)
and a ragged one (float16 × 384 per token, 8–64 tokens, padded with a mask),
with ``num_workers`` 0 and 2 (fork, persistent workers, after a warm-up epoch).
The two loaders alternate epoch by epoch (and which of them goes first), so both see the same background
load; on a shared 2-core machine the 2-worker rows still move by tens of percent between runs.
The epochs are timed with the batch consumed (a sum), not trained on. Peers in the
same table: the same epoch with ``collate_fn=actstore.collate`` (the reference for
the ratio), and a RAM tensor indexed per batch (the cheapest feed there is; fixed
field only). Target: default ÷ ours ≤ 1.15 (median of the epochs).

Run::

    python benchmarks/bench_collate.py            # 200,000 fixed rows, 10,000 ragged rows
    python benchmarks/bench_collate.py --quick    # a tenth of that
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: make `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actstore  # noqa: E402


def build(root: str, rows: int, ragged_rows: int, width: int = 384) -> tuple[str, str, torch.Tensor]:
    gen = np.random.default_rng(0)
    fixed = gen.standard_normal((rows, width)).astype(np.float16)
    with actstore.create(os.path.join(root, "fixed"), {"h": actstore.Field((width,), "float16"),
                                                       "label": actstore.Field((), "int64")}) as w:
        for a in range(0, rows, 50_000):
            b = min(rows, a + 50_000)
            w.append([actstore.key(i) for i in range(a, b)], {"h": fixed[a:b], "label": np.arange(a, b) % 7})
        w.commit()
    lens = gen.integers(8, 65, ragged_rows)
    with actstore.create(os.path.join(root, "ragged"), {"t": actstore.Field((None, width), "float16"),
                                                        "label": actstore.Field((), "int64")}) as w:
        for a in range(0, ragged_rows, 5_000):
            b = min(ragged_rows, a + 5_000)
            w.append([actstore.key(i) for i in range(a, b)],
                     {"t": [gen.standard_normal((int(n), width)).astype(np.float16) for n in lens[a:b]],
                      "label": np.arange(a, b) % 7})
        w.commit()
    return os.path.join(root, "fixed"), os.path.join(root, "ragged"), torch.from_numpy(fixed)


def consume(batch: Any) -> float:
    total = 0.0
    for v in batch.values():
        total += float((v.values if isinstance(v, actstore.PaddedBatch) else v).float().sum())
    return total


def epoch(loader: Any) -> float:
    t = time.perf_counter()
    for batch in loader:
        consume(batch)
    return time.perf_counter() - t


def ram_epoch(x: torch.Tensor, batch: int) -> float:
    t = time.perf_counter()
    perm = torch.randperm(len(x))
    for a in range(0, len(x), batch):
        float(x[perm[a : a + batch]].float().sum())
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the rows")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory() as tmp:
        fixed, ragged, ram = build(tmp, 200_000 // scale, 10_000 // scale)
        print("| store | workers | default collate (s) | actstore.collate (s) | default ÷ ours | RAM tensor (s) |")
        print("|---|---|---|---|---|---|")
        for name, path in (("fixed float16×384", fixed), ("ragged float16×384, 8–64 tokens", ragged)):
            ds = actstore.ActivationDataset(path)
            for workers in (0, 2):
                kw: dict[str, Any] = dict(batch_size=args.batch_size, shuffle=True, num_workers=workers)
                if workers:
                    kw.update(persistent_workers=True, multiprocessing_context="fork")
                plain = DataLoader(ds, **kw)
                ours = DataLoader(ds, collate_fn=actstore.collate, **kw)
                epoch(plain), epoch(ours)  # warm-up: workers started, pages cached
                times: dict[str, list[float]] = {"plain": [], "ours": [], "ram": []}
                for e in range(args.epochs):  # alternate which goes first: both see the same background load
                    for key, loader in ((("plain", plain), ("ours", ours)) if e % 2 else (("ours", ours), ("plain", plain))):
                        times[key].append(epoch(loader))
                    if path == fixed:
                        times["ram"].append(ram_epoch(ram, args.batch_size))
                med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
                ram_s = f"{med['ram']:.3f}" if times["ram"] else "—"
                print(f"| {name} | {workers} | {med['plain']:.3f} | {med['ours']:.3f} | "
                      f"{med['plain'] / med['ours']:.2f} | {ram_s} |", flush=True)
                del plain, ours


if __name__ == "__main__":
    main()
