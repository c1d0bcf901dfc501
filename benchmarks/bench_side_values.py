"""What do side values per dataset position cost?  CachedDataset construction and a labelled epoch.

Over the FAQ data's questions (both question and answer texts: ~17,000 positions, each a ``(text, label)``
pair; a cheap frozen part, so that only actstore's own work is timed), interleaved rounds, best of each:

* construction of ``CachedDataset(pairs, store)`` (the key check of every position, and now the
  side-value check of the same positions) against ``CachedDataset(texts, store_of_texts)`` (the key check
  alone, no side values): the ratio is the side check's share;
* one epoch of batches (256, ``collate_fn=actstore.collate``) with labels served from the view's columns,
  against the same epoch over the bare texts (no labels);
* precompute's bookkeeping per position (item key + label kept in numpy until the final commit).

Usage::

    python benchmarks/bench_side_values.py --data ../shared/data/cloud_faq_dataset.jsonl [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `actstore` importable
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import actstore
from actstore.training.recycled import CachedDataset


def features(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), t.count(" "), ord(t[0]) if t else 0, 1.0] for t in texts])


def load(path: str) -> list[str]:
    out: list[str] = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            out += [d["question"], d["answer"]]
    return out


def epoch(ds: Any) -> int:
    n = 0
    for batch in torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=actstore.collate):
        n += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    texts = load(args.data)
    pairs = [(t, i % 7) for i, t in enumerate(texts)]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).requires_grad_(False)
    with tempfile.TemporaryDirectory() as d:
        kw: dict[str, Any] = {"layers": "1", "collate_fn": features, "batch_size": 512, "progress": False}
        actstore.precompute(model, pairs, os.path.join(d, "pairs"), **kw)
        actstore.precompute(model, texts, os.path.join(d, "texts"), **kw)
        times: dict[str, list[float]] = {k: [] for k in ("build labels", "build bare", "epoch labels", "epoch bare")}
        for _ in range(args.rounds):  # interleaved
            for name, data, path in (("labels", pairs, "pairs"), ("bare", texts, "texts")):
                t0 = time.perf_counter()
                ds = CachedDataset(data, os.path.join(d, path))
                times[f"build {name}"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert epoch(ds) == len(texts)
                times[f"epoch {name}"].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        print(f"{len(texts):,} positions, best of {args.rounds} interleaved rounds")
        print(f"{'':28s}{'labels (s)':>12s}{'bare (s)':>10s}{'ratio':>8s}")
        for what in ("build", "epoch"):
            a, b = best[f"{what} labels"], best[f"{what} bare"]
            label = "CachedDataset(...) checks" if what == "build" else "one epoch, batch 256"
            print(f"{label:28s}{a:12.3f}{b:10.3f}{a / b:8.2f}")
        print("precompute bookkeeping per position: 32 B item key + 8 B int label (numpy, until the final commit)")


if __name__ == "__main__":
    main()
