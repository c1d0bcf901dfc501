#!/usr/bin/env python
"""Head-only fine-tuning of all-MiniLM-L6-v2 on the cloud FAQ data, from an activation store.

The frozen part of the model runs once (``actstore.precompute``); every epoch
then reads its activations from the store through :class:`actstore.CachedDataset`
(the original texts are not read again) and trains only the head with a
symmetric in-batch contrastive loss (multiple negatives ranking: each question's
answer is its positive, the other answers in the batch its negatives, and the
other way round).

Two heads (``--head``):

``mlp`` (default)
    The whole encoder is recycled: the store holds the normalised sentence
    embeddings, the head is a residual 2-layer MLP on them (initialised to the
    identity, so epoch 0 is the frozen model).
``blocks``
    Half of the encoder is recycled: the store holds the per-token hidden states
    after block 2 (float16, ragged), the head is blocks 3–5 + mean pooling +
    normalize, split off the model with :func:`actstore.models.split`.

Metrics, over the validation pairs (questions → answers, every validation
answer a candidate): RP@1, the share of questions whose nearest answer is
theirs, and RRK, the mean reciprocal rank of their answer.

Example::

    python scripts/train_head.py --data /work/shared/data/cloud_faq_dataset.jsonl --store runs/faq-mlp.store
    python scripts/train_head.py --data .../cloud_faq_dataset.jsonl --store runs/faq-blocks.store --head blocks --epochs 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

if __package__ in (None, ""):  # run from a checkout: make `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actstore.examples.faq import Tokenize, load_minilm, read_pairs  # noqa: E402
from actstore.training.collate import ActivationCollate, PaddedBatch  # noqa: E402
from actstore.training.recycled import CachedDataset  # noqa: E402

TOKENS_LAYER = "0.auto_model.encoder.layer.2"


class PairBatches(Dataset):  # type: ignore[type-arg]
    """Pair ``i`` = (text ``q[i]``, text ``a[i]``) of a CachedDataset; one batch is one gather of 2B rows.

    ``__getitems__`` asks the CachedDataset for the questions then the answers of
    the batch, so the collated batch holds B questions followed by their B answers.
    """

    def __init__(self, texts: CachedDataset, q: np.ndarray, a: np.ndarray) -> None:
        self.texts, self.q, self.a = texts, q, a

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, i: int) -> Any:
        return self.texts[int(self.q[i])], self.texts[int(self.a[i])]

    def __getitems__(self, idx: list[int]) -> Any:
        return self.texts.__getitems__(np.concatenate([self.q[idx], self.a[idx]]))


class ResidualMLP(nn.Module):
    """``normalize(e + W2 gelu(W1 e))``; W2 starts at zero, so the untrained head is the identity."""

    def __init__(self, dim: int = 384, hidden: int = 1536) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(e + self.down(nn.functional.gelu(self.up(e))), dim=-1)


def encode(head: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, PaddedBatch):
        return nn.functional.normalize(head(batch.values, batch.mask), dim=-1)
    return head(batch)


def mnr_loss(q: torch.Tensor, a: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Symmetric multiple-negatives ranking loss over in-batch pairs (cosine similarities × scale)."""
    sims = scale * q @ a.T
    target = torch.arange(len(q))
    return (nn.functional.cross_entropy(sims, target) + nn.functional.cross_entropy(sims.T, target)) / 2


@torch.no_grad()
def evaluate(head: nn.Module, texts: CachedDataset, q: np.ndarray, a: np.ndarray, answers: list[str],
             collate: ActivationCollate) -> tuple[float, float]:
    """(RP@1, RRK) of validation questions against every distinct validation answer."""
    head.eval()

    def embed(pos: np.ndarray) -> torch.Tensor:
        out = [encode(head, collate(texts.__getitems__(pos[i : i + 256]))) for i in range(0, len(pos), 256)]
        return torch.cat(out)

    distinct = sorted(set(answers))
    where = {t: i for i, t in enumerate(distinct)}
    first = {t: int(a[i]) for i, t in reversed(list(enumerate(answers)))}  # one position per distinct answer
    cand = embed(np.array([first[t] for t in distinct]))
    qe = embed(q)
    gold = torch.tensor([where[t] for t in answers])
    sims = qe @ cand.T
    rank = (sims > sims[torch.arange(len(q)), gold][:, None]).sum(1) + 1  # 1 = the right answer is nearest
    head.train()
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the cloud FAQ JSONL file (question, answer per line)")
    p.add_argument("--store", required=True, help="the activation store (created by precompute, or resumed)")
    p.add_argument("--head", choices=["mlp", "blocks"], default="mlp")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step (default 64)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3 for mlp, 2e-5 for blocks)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("--quick", action="store_true", help="1,000 pairs, 2 epochs")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the training batches")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file")
    try:
        from actstore.precompute.api import precompute
    except ImportError as e:
        raise SystemExit(f"actstore.precompute is not available ({e}): this script builds its store with it") from None

    limit = args.limit or (1000 if args.quick else None)
    epochs = 2 if args.quick and args.epochs == 5 else args.epochs
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        qa = read_pairs(args.data, group_field=None)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    pairs = list(zip(qa.questions, qa.answers, strict=True))[:limit]
    order = list(range(len(pairs)))
    random.shuffle(order)
    n_val = int(len(pairs) * args.val_fraction)
    val, train = order[:n_val], order[n_val:]
    n = len(pairs)
    texts = [q for q, _ in pairs] + [a for _, a in pairs]  # position i: question i; n + i: answer i

    model = load_minilm().eval()
    t0 = time.perf_counter()
    layers, dtype = (None, None) if args.head == "mlp" else (TOKENS_LAYER, "float16")
    store = precompute(model, texts, args.store, layers=layers, collate_fn=Tokenize(model), store_dtype=dtype,
                       batch_size=64, progress=sys.stderr.isatty())
    print(f"store {args.store}: {len(store):,} rows for {len(texts):,} texts, fields {sorted(store.fields)} "
          f"({time.perf_counter() - t0:.0f} s, rerun: resumes)")

    cached = CachedDataset(texts, store, collate_fn=Tokenize(model))  # position -> row through the 'dataset' view
    if args.head == "mlp":
        head: nn.Module = ResidualMLP()
        lr = args.lr or 1e-3
    else:
        from actstore.models.split import split

        _, head = split(model, TOKENS_LAYER)
        lr = args.lr or 2e-5
    collate = ActivationCollate(torch.float32)
    tq, ta = np.array(train), np.array(train) + n
    vq, va = np.array(val), np.array(val) + n
    val_answers = [pairs[i][1] for i in val]
    loader = DataLoader(PairBatches(cached, tq, ta), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=args.workers, persistent_workers=args.workers > 0)
    opt = torch.optim.AdamW([q for q in head.parameters() if q.requires_grad], lr=lr)

    rp1, rrk = evaluate(head, cached, vq, va, val_answers, collate)
    print(f"{len(train):,} training pairs, {len(val):,} validation pairs; head {args.head}, lr {lr:g}")
    print(f"epoch 0 (frozen model): RP@1 {rp1:.3f}  RRK {rrk:.3f}")
    results = [(0, float("nan"), rp1, rrk, 0.0)]
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        losses = []
        head.train()
        for batch in loader:
            emb = encode(head, batch)
            b = len(emb) // 2
            loss = mnr_loss(emb[:b], emb[b:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        took = time.perf_counter() - t0
        rp1, rrk = evaluate(head, cached, vq, va, val_answers, collate)
        results.append((epoch, float(np.mean(losses)), rp1, rrk, took))
        print(f"epoch {epoch}: loss {np.mean(losses):.4f}  RP@1 {rp1:.3f}  RRK {rrk:.3f}  ({took:.1f} s)")
    print("\n| epoch | train loss | RP@1 | RRK | epoch time (s) |\n|---|---|---|---|---|")
    for e, loss, r1, rr, took in results:
        print(f"| {e} | {'-' if e == 0 else f'{loss:.4f}'} | {r1:.3f} | {rr:.3f} | {'-' if e == 0 else f'{took:.1f}'} |")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
