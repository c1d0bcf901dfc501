"""What stored augmentations cost: an epoch served from a K-augmentation store, and the precompute of K augmentations.

1. **Epoch.**  A store of ``K`` augmentations of ``N`` items (``K * N`` rows)
   served by ``CachedDataset(augmentation="random")``, one augmentation per item
   per epoch, against a store of the same ``N`` items without augmentations
   (``CachedDataset``): the same rows per epoch, shuffled alike, gathered in
   batches by ``ActivationCollate`` (what a DataLoader does without workers).
   Target: ratio <= 1.05.
2. **Precompute.**  ``precompute(augment=fn, augmentations=K)`` over ``N``
   texts, against ``K`` times a plain precompute of the ``N`` texts (the
   issue's peer; each plain run pays the fixed costs once, which flatters the
   ratio) and against one plain precompute of the ``K * N`` augmented texts
   themselves, in the augmented run's order (the same forwards and padding
   without the augmentation machinery: content keys, the augment calls, the
   derived keys).  Target: ratio <= 1.05.

Rounds are interleaved (the two sides alternate, order flipped each round) and
the ratios are per round, so a load change hits both sides alike.

    python benchmarks/bench_augment.py [--items 20000] [--texts 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore import CachedDataset, precompute
from actstore.precompute.augment import AugmentedItems, augment_generator
from actstore.precompute.inputs import input_keys
from actstore.training.collate import ActivationCollate
from benchmarks.common import machine


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=g)


def epoch(ds: Any, order: np.ndarray, batch: int, collate: ActivationCollate) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(order), batch):
        collate(ds.__getitems__(order[i: i + batch].tolist()))
    return time.perf_counter() - t0


def bench_epoch(root: str, n: int, k: int, rounds: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 384))
    data = [(torch.randn(64), i % 10) for i in range(n)]
    kw: dict[str, Any] = dict(layers="0", progress=False, batch_size=1024, store_dtype="float16")
    precompute(model, data, os.path.join(root, "plain"), **kw)
    precompute(model, data, os.path.join(root, "aug"), augment=noise, augmentations=k, **kw)
    big = [(torch.randn(64), i % 10) for i in range(n * k)]  # the footprint peer: K*N rows, N served per epoch
    precompute(model, big, os.path.join(root, "big"), **kw)
    plain = CachedDataset(data, os.path.join(root, "plain"), check=0)
    aug = CachedDataset(data, os.path.join(root, "aug"), augmentation="random", check=0)
    wide = CachedDataset(big, os.path.join(root, "big"), check=0)
    collate = ActivationCollate()
    rng = np.random.default_rng(0)
    ratios, footprint = [], []
    # Warm the page cache and the maps: every row of every store (the K-augmentation store's over its first K
    # epochs, each of which serves rows the earlier ones did not: its first pass maps K times the pages).
    for e in range(k):
        aug.set_epoch(e)
        epoch(aug, np.arange(len(aug)), batch, collate)
    for ds in (plain, wide):
        epoch(ds, np.arange(len(ds)), batch, collate)
    for r in range(rounds):
        order = rng.permutation(n)
        spread = rng.choice(n * k, n, replace=False)  # N of the K*N rows, at random
        aug.set_epoch(k + r)
        t: dict[str, float] = {}
        for name in (["plain", "aug", "wide"] if r % 2 == 0 else ["wide", "aug", "plain"]):
            ds, idx = {"plain": (plain, order), "aug": (aug, order), "wide": (wide, spread)}[name]
            t[name] = epoch(ds, idx, batch, collate)
        ratios.append(t["aug"] / t["plain"])
        footprint.append(t["aug"] / t["wide"])
        print(f"  epoch round {r}: plain {t['plain'] * 1e3:.1f} ms, K={k} {t['aug'] * 1e3:.1f} ms, {k}x-rows plain "
              f"store {t['wide'] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return ratios, footprint


def bench_precompute(root: str, n_texts: int, k: int, rounds: int, data_path: str) -> tuple[list[float], list[float]]:
    from actstore.examples.faq.augment import augment_question
    from actstore.examples.faq.data import read_pairs
    from actstore.examples.faq.model import Tokenize, load_minilm
    from actstore.models.split import split

    texts = read_pairs(data_path).questions[:n_texts]
    model = load_minilm()
    collate = Tokenize(model)
    layer = [str(split(model, 0.5)[0].at)]
    # The K augmentations precompute makes, as plain texts, in its run order (tiles of items, augmentation-major:
    # the same batches, so the same padding, as the augmented run).
    content = [input_keys(collate([t]), 1)[0] for t in texts]
    run = AugmentedItems(texts, k)
    augmented = []
    for j in range(len(run)):
        v, p = run.item_of(j)
        augmented.append(augment_question(texts[p], augment_generator(content[p], v)))
    kw: dict[str, Any] = dict(layers=layer, collate_fn=collate, progress=False, batch_size=64, store_dtype="float16")
    vs_k, vs_texts = [], []
    for r in range(rounds):
        times: dict[str, float] = {}
        order = ["plain", "aug", "aug-texts"] if r % 2 == 0 else ["aug-texts", "aug", "plain"]
        for what in order:
            path = os.path.join(root, f"{what}-{r}")
            t0 = time.perf_counter()
            if what == "plain":
                precompute(model, texts, path, **kw)
            elif what == "aug":
                precompute(model, texts, path, augment=augment_question, augmentations=k, **kw)
            else:
                precompute(model, augmented, path, **kw)
            times[what] = time.perf_counter() - t0
            shutil.rmtree(path, ignore_errors=True)
        vs_k.append(times["aug"] / (k * times["plain"]))
        vs_texts.append(times["aug"] / times["aug-texts"])
        print(f"  precompute round {r}: plain {times['plain']:.2f} s, K={k} {times['aug']:.2f} s, "
              f"plain over the {len(augmented)} augmented texts {times['aug-texts']:.2f} s", file=sys.stderr, flush=True)
    return vs_k, vs_texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--augmentations", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="/work/shared/data/cloud_faq_dataset.jsonl")
    p.add_argument("--skip", choices=["epoch", "precompute"])
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-augment-")
    k = args.augmentations
    load = os.getloadavg()
    try:
        lines = [f"### Stored augmentations: K = {k}", "", "| measure | median ratio | per round | target |",
                 "|---|---|---|---|"]
        if args.skip != "epoch":
            r, w = bench_epoch(root, args.items, k, args.rounds, args.batch_size)
            lines.append(f"| epoch from a K={k} store ÷ epoch from a store without augmentations ({args.items:,} "
                         f"items, same rows per epoch) | {statistics.median(r):.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in r)} | ≤ 1.05 |")
            lines.append(f"| epoch from a K={k} store ÷ {args.items:,} random rows of a plain store of {k}× the rows "
                         f"(the same file size: the footprint peer) | {statistics.median(w):.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in w)} | - |")
        if args.skip != "precompute":
            a, b = bench_precompute(root, args.texts, k, args.rounds, args.data)
            lines.append(f"| precompute of K={k} augmentations ÷ {k} × one plain precompute ({args.texts} FAQ "
                         f"questions, MiniLM 50%) | {statistics.median(a):.3f} | {', '.join(f'{x:.3f}' for x in a)} "
                         "| ≤ 1.05 |")
            lines.append(f"| precompute of K={k} augmentations ÷ one plain precompute of the {k * args.texts} "
                         f"augmented texts | {statistics.median(b):.3f} | {', '.join(f'{x:.3f}' for x in b)} | - |")
        end = os.getloadavg()
        lines += ["", f"Machine: {machine()}. Load average (1 min) {load[0]:.1f} at the start, {end[0]:.1f} at "
                  f"the end. {args.rounds} interleaved rounds."]
        print("\n".join(lines))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
