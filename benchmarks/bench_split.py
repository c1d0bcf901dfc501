"""Does split's head add overhead? A head step on cached states against the same blocks inside the full model.

For each model (MiniLM's architecture, a small GPT-2 and a small Llama, all
built from configs with random weights — the architecture is what costs),
split at 50% and time, in lockstep rounds (one of each per round, so every
variant sees the same background load; the machine is shared):

``full``
    A training step of the whole model with the lower half frozen
    (``requires_grad=False`` on the stem and blocks ``0..k``): forward of
    everything, backward and AdamW step through the upper half only.
``lower``
    The frozen part's forward alone under ``no_grad`` (what recycling saves).
``head``
    A training step of ``head`` on the cached states (a right-padded batch
    and its mask, already in RAM): ``head(states, mask)``, backward, step.

The upper blocks' share of a full step is ``full - lower``; the target is
``head / (full - lower) <= 1.05`` (the stand-ins and the model's own mask
construction add nothing measurable). ``head / full`` is the step-time
saving of recycling at this depth. Medians over ``--rounds`` rounds.

Run::

    python benchmarks/bench_split.py            # ~1-2 minutes on 2 cores
    python benchmarks/bench_split.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actstore.models.capture import capture  # noqa: E402
from actstore.models.split import split  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def models() -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "MiniLM-L6 (BERT, 384)": lambda: tf.BertModel(tf.BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            max_position_embeddings=512), add_pooling_layer=False),
        "GPT-2 (6 x 384)": lambda: tf.GPT2Model(tf.GPT2Config(
            vocab_size=50257, n_embd=384, n_layer=6, n_head=6, n_positions=512)),
        "Llama (6 x 384, GQA)": lambda: tf.LlamaModel(tf.LlamaConfig(
            vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=512)),
    }


def batch_of(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    width = int(lengths.max())
    ids = torch.randint(1, vocab, (n, width), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, build: Callable[[], Any], batch: dict[str, torch.Tensor], rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().train()  # dropout on, as in training
    frozen, head = split(model, 0.5)
    for p in frozen.parameters():
        p.requires_grad_(False)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    mask = batch["attention_mask"]
    real = mask.bool()
    with torch.no_grad():
        states = frozen(**batch).as_subclass(torch.Tensor).clone()

    def step(loss_of: Callable[[], torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_of().backward()
        opt.step()

    def full() -> None:
        step(lambda: model(**batch).last_hidden_state[real].pow(2).mean())

    def lower() -> None:
        with torch.no_grad():
            capture(model, batch, frozen.at)

    def recycled() -> None:
        step(lambda: head(states, mask).last_hidden_state[real].pow(2).mean())

    variants = {"full": full, "lower": lower, "head": recycled}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            times[key].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    share = med["full"] - med["lower"]
    # Per-round ratios too: the share is a difference of two noisy times.
    per_round = [h / (f - lo) for h, f, lo in zip(times["head"], times["full"], times["lower"], strict=True) if f > lo]
    return {"model": name, "at": frozen.at, "tokens": int(mask.sum()), **med, "share": share,
            "ratio": med["head"] / share, "ratio_rounds": statistics.median(per_round) if per_round else float("nan"),
            "speedup": med["full"] / med["head"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a smaller batch")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier timings on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 25)
    n = args.batch or (8 if args.quick else 32)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; batch {n} texts of "
          f"16-48 tokens (right-padded); split at 0.5; medians over {rounds} lockstep rounds")
    rows = []
    for name, build in models().items():
        vocab = 30000
        rows.append(bench(name, build, batch_of(n, 16, 48, vocab), rounds))
    print()
    print("| model | split after | full step ms | lower fwd ms | upper share ms | head step ms | "
          "head / share | (per round) | full / head |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['at']} | {r['full'] * 1e3:.1f} | {r['lower'] * 1e3:.1f} | {r['share'] * 1e3:.1f} | "
              f"{r['head'] * 1e3:.1f} | {r['ratio']:.3f} | {r['ratio_rounds']:.3f} | {r['speedup']:.2f}x |")
    worst = max(r["ratio"] for r in rows)
    print(f"\ntarget head / share <= 1.05: worst {worst:.3f} ({'met' if worst <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
