"""Recycling with data augmentation on the FAQ data: no augmentation, K stored augmentations, on-the-fly.

The scarce-data setting of ``qa_recycling.py --fractions 0.1``: all-MiniLM-L6-v2,
the stratified split (75%, seed 42), the first 637 of the training pairs
(shuffled with seed 43: the scarce study's 10% subset), evaluated on all 2,124
validation pairs (RP@1 / RRK of the validation questions against the distinct
validation answers).  Two depths — 50% recycling (the upper 3 blocks train) and
head only (a skip-connection head on the sentence embedding) — and three arms
each, for each seed:

- ``none``: questions and answers from a plain store;
- ``stored K``: each question served one of its K stored augmentations per
  epoch (``precompute(augment=augment_question, augmentations=K)`` and
  ``CachedDataset(augmentation="random")``), answers from the plain store;
- ``on the fly``: each step augments its questions with a fresh generator and
  runs the frozen part on them (the activations cast to the store's dtype, as a
  store would hold them), answers from the plain store.

The augmentation is :func:`actstore.examples.faq.augment.augment_question`
(word dropout and one adjacent swap).  Prints a Markdown table and writes
``OUT.json``, ``OUT.md`` and ``OUT.png``.

    python benchmarks/augment_experiment.py --data /work/shared/data/cloud_faq_dataset.jsonl \
        --out benchmarks/results/augment_experiment
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from actstore import CachedDataset, precompute
from actstore.examples.faq.augment import augment_question
from actstore.examples.faq.data import corpus, read_pairs, stratified_split
from actstore.examples.faq.loops import epoch_batches, optimizer, optimizer_step
from actstore.examples.faq.losses import mnrl_loss
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.model import SkipConnectionHead, Tokenize, embedding_dim, load_minilm
from actstore.models.capture import reduce_output
from actstore.models.split import split
from actstore.training.collate import ActivationCollate


def _rows_of(store: Any, texts: list[str]) -> dict[str, int]:
    view = store.view("dataset")
    return {t: int(view[i]) for i, t in enumerate(texts)}


class Gather:
    """Rows of a store by text (plain store) → what the head eats: a padded (values, mask) or a (n, d) tensor."""

    def __init__(self, store: Any, texts: list[str]) -> None:
        from actstore.training.datasets import ActivationDataset

        self.row = _rows_of(store, texts)
        field = next(iter(store.fields))
        self.field = field
        self.ds = ActivationDataset(store, fields=[field])
        self.collate = ActivationCollate(torch.float32, mask_dtype=torch.int64)

    def __call__(self, texts: list[str]) -> Any:
        return self.collate(self.ds.__getitems__([self.row[t] for t in texts]))[self.field]


def head_of(head: Any, got: Any) -> Any:
    if isinstance(got, tuple):
        return head(got[0], got[1])
    return head(got)


def encode(head: Any, gather: Gather, texts: list[str], batch: int = 256) -> Any:
    head.eval()
    with torch.inference_mode():
        out = [head_of(head, gather(texts[i: i + batch])) for i in range(0, len(texts), batch)]
    head.train()
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="benchmarks/results/augment_experiment")
    p.add_argument("--pairs", type=int, default=637, help="training pairs (default 637: the scarce study's 10%%)")
    p.add_argument("--augmentations", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--depths", default="50,head")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-pairs", type=int, help="evaluate on the first N validation pairs only (a smoke run)")
    p.add_argument("--workdir")
    p.add_argument("--stores", help="keep the stores in this directory (resumed by a later run) instead of a "
                                    "temporary one")
    p.add_argument("--merge", help="no training: OUT.md/.png from these runs' JSON files (comma-separated), e.g. "
                                   "one run per seed")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), args.out)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    k = args.augmentations
    pairs = read_pairs(args.data)
    train_idx, val_idx = stratified_split(pairs.groups, 0.75, 42)
    order = list(train_idx)
    random.Random(43).shuffle(order)
    subset = sorted(order[: args.pairs])
    train_q = [pairs.questions[i] for i in subset]
    train_a = [pairs.answers[i] for i in subset]
    val = pairs.subset(val_idx[: args.val_pairs] if args.val_pairs else val_idx)
    answers, relevant = corpus(val.answers)
    model = load_minilm().eval()  # the frozen part runs in eval mode (no dropout), as precompute runs it
    collate = Tokenize(model)
    texts = list(dict.fromkeys(train_q + train_a + val.questions + answers))
    root = args.stores or tempfile.mkdtemp(prefix="augment-exp-", dir=args.workdir)
    os.makedirs(root, exist_ok=True)
    results: list[dict[str, Any]] = []
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        for depth in args.depths.split(","):
            at = 0.5 if depth == "50" else 1.0
            layer = None
            if at < 1:
                frozen, _ = split(model, at)
                layer = [str(frozen.at)]
            dtype = "float16" if at < 1 else "float32"
            t0 = time.perf_counter()
            plain = precompute(model, texts, os.path.join(root, f"plain-{depth}"), layers=layer, collate_fn=collate,
                               store_dtype=dtype, progress=False, batch_size=128)
            plain_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            aug_store = precompute(model, train_q, os.path.join(root, f"aug-{depth}"), layers=layer,
                                   collate_fn=collate, store_dtype=dtype, progress=False, batch_size=128,
                                   augment=augment_question, augmentations=k)
            aug_s = time.perf_counter() - t0
            log(f"{depth}: plain store of {len(texts):,} texts in {plain_s:.0f} s; {k} augmentations of "
                f"{len(train_q)} questions in {aug_s:.0f} s ({aug_store.info()['bytes_on_disk'] / 1e6:.1f} MB)")
            gather = Gather(plain, texts)
            for arm in ("none", f"stored {k}", "on the fly"):
                for seed in seeds:
                    row = run_arm(model, depth, at, arm, seed, args, train_q, train_a, val.questions, answers,
                                  relevant, gather, aug_store, collate, k, dtype)
                    d = row.to_json()
                    d.update(depth=depth, arm=arm, seed=seed, augment_precompute_seconds=aug_s,
                             plain_precompute_seconds=plain_s,
                             augment_store_mb=aug_store.info()["bytes_on_disk"] / 1e6)
                    results.append(d)
                    log(f"{depth} {arm} seed {seed}: RP@1 {row.rp1:.4f} RRK {row.rrk:.4f}, "
                        f"{sum(row.epoch_seconds):.1f} s training")
                    save(args, results, len(val.questions), started, len(subset))  # partial results survive
            plain.close()
            aug_store.close()
    finally:
        if not args.stores:
            shutil.rmtree(root, ignore_errors=True)
    report = save(args, results, len(val.questions), started, len(subset))
    md = table(report)
    print(md)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    plot(report, args.out + ".png")
    return 0


def faq_questions() -> list[str]:
    """``actstore bench --data`` factory: the 637 training questions of the study (``$FAQ_DATA``, default the shared
    path), for ``actstore bench --augment actstore.examples.faq.augment:question_augment --augmentations 4``."""
    pairs = read_pairs(os.environ.get("FAQ_DATA", "/work/shared/data/cloud_faq_dataset.jsonl"))
    train_idx, _ = stratified_split(pairs.groups, 0.75, 42)
    order = list(train_idx)
    random.Random(43).shuffle(order)
    return [pairs.questions[i] for i in sorted(order[:637])]


def save(args: argparse.Namespace, results: list[dict[str, Any]], n_val: int, started: float,
         n_train: int) -> dict[str, Any]:
    report = {"args": vars(args), "rows": results, "validation_questions": n_val,
              "wall_seconds": time.perf_counter() - started, "train_pairs": n_train,
              "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    return report


def merge(paths: list[str], out: str) -> int:
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    merged = dict(reports[0])
    merged["rows"] = [r for rep in reports for r in rep["rows"]]
    merged["wall_seconds"] = max(rep["wall_seconds"] for rep in reports)
    merged["merged_from"] = paths
    merged["args"] = dict(reports[0]["args"], seeds=",".join(rep["args"]["seeds"] for rep in reports))
    with open(out + ".json", "w") as f:
        json.dump(merged, f, indent=1)
    md = table(merged)
    print(md)
    with open(out + ".md", "w") as f:
        f.write(md + "\n")
    plot(merged, out + ".png")
    return 0


def run_arm(model: Any, depth: str, at: float, arm: str, seed: int, args: argparse.Namespace, train_q: list[str],
            train_a: list[str], val_q: list[str], answers: list[str], relevant: list[int], gather: Gather,
            aug_store: Any, collate: Any, k: int, dtype: str) -> RowResult:
    torch.manual_seed(seed)
    if at < 1:
        frozen, head = split(model, at)
        for q in frozen.parameters():
            q.requires_grad_(False)
        head = _fresh_copy(head)
        lr = 2e-5
    else:
        frozen, head, lr = None, SkipConnectionHead(embedding_dim(model)), 1e-3
    params = [q for q in head.parameters() if q.requires_grad]
    row = RowResult(f"{depth} {arm}", epochs=args.epochs, trainable_params=sum(q.numel() for q in params))
    rng = random.Random(seed)
    steps = args.epochs * len(epoch_batches(len(train_q), args.batch_size, random.Random(0)))
    opt, sched = optimizer(params, lr, steps)
    served = None
    if arm.startswith("stored"):
        served = CachedDataset(train_q, aug_store, collate_fn=collate, augmentation="random",
                               augment=augment_question, augment_seed=seed)
        served_collate = ActivationCollate(torch.float32, mask_dtype=torch.int64)
    step = 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        head.train()
        if served is not None:
            served.set_epoch(epoch)
        for idx in epoch_batches(len(train_q), args.batch_size, rng):
            if served is not None:
                q_in = served_collate(served.__getitems__(idx))
            elif arm == "on the fly":
                g = torch.Generator().manual_seed(1_000_003 * seed + step)
                q_in = on_the_fly(model, frozen, collate, [augment_question(train_q[i], g) for i in idx], dtype)
            else:
                q_in = gather([train_q[i] for i in idx])
            a_in = gather([train_a[i] for i in idx])
            loss = mnrl_loss(head_of(head, q_in), head_of(head, a_in))
            optimizer_step(opt, loss)
            sched.step()
            step += 1
        row.epoch_seconds.append(time.perf_counter() - t0)
    t1 = time.perf_counter()
    q = encode(head, gather, val_q)
    a = encode(head, gather, answers)
    row.set_metrics(q, a[relevant], a, relevant)
    row.eval_seconds = time.perf_counter() - t1
    return row


def _fresh_copy(head: Any) -> Any:
    """The head as split made it shares the model's upper blocks: train a copy, so every arm starts from the
    pretrained weights."""
    import copy

    return copy.deepcopy(head)


def on_the_fly(model: Any, frozen: Any, collate: Any, texts: list[str], dtype: str) -> Any:
    """The frozen part's output on freshly augmented questions, cast to the store's dtype as a store holds it."""
    batch = collate(texts)
    model.eval()
    with torch.no_grad():
        if frozen is None:
            out = model(batch)["sentence_embedding"]
            return out.to(getattr(torch, dtype)).float().clone()
        hidden = reduce_output(frozen(batch), "output")
        return hidden.to(getattr(torch, dtype)).float().clone(), batch["attention_mask"].clone()


def table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    n = report["validation_questions"]
    lines = [f"### Recycling with augmentation: RP@1 (RRK), {report['train_pairs']} training pairs, "
             f"{len(report['args']['seeds'].split(','))} seeds", "",
             "| depth | arm | RP@1 mean (per seed) | ± 1 SE | RRK mean | s/epoch | precompute s | store MB |",
             "|---|---|---|---|---|---|---|---|"]
    for depth in dict.fromkeys(r["depth"] for r in rows):
        for arm in dict.fromkeys(r["arm"] for r in rows if r["depth"] == depth):
            rs = [r for r in rows if r["depth"] == depth and r["arm"] == arm]
            rp1 = statistics.mean(r["rp1"] for r in rs)
            # one standard error: the binomial SE over the validation questions, pooled over the seeds, combined
            # with the spread between seeds
            se_q = math.sqrt(rp1 * (1 - rp1) / (n * len(rs)))
            se_s = statistics.stdev(r["rp1"] for r in rs) / math.sqrt(len(rs)) if len(rs) > 1 else 0.0
            se = math.sqrt(se_q**2 + se_s**2)
            per = ", ".join(f"{r['rp1']:.3f}" for r in rs)
            s_epoch = statistics.mean(statistics.mean(r["epoch_seconds"]) for r in rs)
            stored = arm.startswith("stored")
            pre = rs[0]["augment_precompute_seconds"] if stored else rs[0]["plain_precompute_seconds"]
            mb = f"{rs[0]['augment_store_mb']:.1f}" if stored else "-"
            lines.append(f"| {depth} | {arm} | {rp1:.3f} ({per}) | {se:.3f} | "
                         f"{statistics.mean(r['rrk'] for r in rs):.3f} | {s_epoch:.1f} | "
                         f"{pre:.0f}{' (augmentations only)' if stored else ' (plain store)'} | {mb} |")
    lines += ["", f"Total wall time {report['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["rows"]
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, depth in enumerate(depths):
            rs = [r["rp1"] for r in rows if r["depth"] == depth and r["arm"] == arm]
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, statistics.mean(rs), width, color=f"C{j}", label=arm if i == 0 else None)
            ax.scatter([x] * len(rs), rs, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(depths)), [f"{d}% recycling" if d != "head" else "head only" for d in depths])
    ax.set_ylabel("RP@1 (validation)")
    lo = min(r["rp1"] for r in rows)
    ax.set_ylim(max(0, lo - 0.03), max(r["rp1"] for r in rows) + 0.02)
    ax.legend(fontsize=8)
    ax.set_title(f"{report['train_pairs']} training pairs; bars: mean of seeds, dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
