"""Interleaved step timing of every way the FAQ study trains: full, recomputed prefix, from the store."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from actstore.examples.faq.data import Pairs
from actstore.examples.faq.loops import StoreRows, apply_head, layer_field, optimizer_step, progress_bar
from actstore.examples.faq.losses import mnrl_loss
from actstore.examples.faq.model import SkipConnectionHead, Tokenize, embedding_dim
from actstore.models.split import split

__all__ = ["head_recompute_step", "recompute_step", "time_steps"]


@dataclass
class _Variant:
    name: str
    step: Callable[[list[int]], None]


def _from_store(gather: StoreRows, n_pairs: int, head: Any, opt: Any) -> Callable[[list[int]], None]:
    """A training step of ``head`` on pairs ``idx`` read from the store (questions first, then answers)."""

    def step(idx: list[int]) -> None:
        q = gather(idx)
        a = gather([n_pairs + i for i in idx])
        optimizer_step(opt, mnrl_loss(apply_head(head, q), apply_head(head, a)))

    return step


def _recompute(model_factory: Callable[[], Any], at: float, all_pairs: Pairs) -> tuple[Callable[[list[int]], None],
                                                                                    Any, Any]:
    """A step of the upper blocks with the frozen first ``at`` recomputed (no_grad); the step, head and optimiser."""
    import torch


    model = model_factory()
    frozen, head = split(model, at)
    frozen.eval()
    head.train()
    for p in frozen.parameters():
        p.requires_grad_(False)
    tk = Tokenize(model)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-9)
    qs, ans = all_pairs.questions, all_pairs.answers

    def recompute(idx: list[int]) -> None:
        embs = []
        for side in (qs, ans):
            feats = tk([side[i] for i in idx])
            with torch.no_grad():
                hidden = frozen(feats)
            embs.append(head(hidden, feats["attention_mask"]))
        optimizer_step(opt, mnrl_loss(*embs))

    return recompute, head, opt


def _head_recompute(model_factory: Callable[[], Any], all_pairs: Pairs) -> tuple[Callable[[list[int]], None], Any,
                                                                                 Any]:
    """A step of a skip-connection head on the whole model's embedding, recomputed (no_grad) every step."""
    import torch

    model = model_factory().eval()
    tk = Tokenize(model)
    skip = SkipConnectionHead(embedding_dim(model))
    opt = torch.optim.AdamW(skip.parameters(), lr=1e-9)
    qs, ans = all_pairs.questions, all_pairs.answers

    def head_recompute(idx: list[int]) -> None:
        with torch.no_grad():
            q = model(tk([qs[i] for i in idx]))["sentence_embedding"]
            a = model(tk([ans[i] for i in idx]))["sentence_embedding"]
        optimizer_step(opt, mnrl_loss(skip(q), skip(a)))

    return head_recompute, skip, opt


def recompute_step(model_factory: Callable[[], Any], at: float, all_pairs: Pairs) -> Callable[[list[int]], None]:
    """A timing-only training step (lr 1e-9) of a fresh model's upper blocks, the first ``at`` recomputed each step.

    The step takes indices of ``all_pairs``.
    """
    return _recompute(model_factory, at, all_pairs)[0]


def head_recompute_step(model_factory: Callable[[], Any], all_pairs: Pairs) -> Callable[[list[int]], None]:
    """A timing-only step (lr 1e-9) of a skip-connection head on a fresh model's embedding, recomputed each step."""
    return _head_recompute(model_factory, all_pairs)[0]


def time_steps(model_factory: Callable[[], Any], all_pairs: Pairs, train_idx: Sequence[int], *,
               stores: dict[float, str], head_store: str | None, batch_size: int, steps: int, rounds: int,
               seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Median seconds per training step of every variant, measured interleaved.

    Variants: ``full`` (every layer trained), and for each ``at -> store path``
    of ``stores`` (a store that :func:`train_recycled` made over ``all_pairs``):
    ``recompute@at`` (frozen prefix recomputed under ``no_grad`` every step,
    the rest trained) and ``recycled@at`` (the rest trained from the store),
    plus ``head-recompute`` / ``head-recycled`` for the skip-connection head
    when ``head_store`` is given.  Each round runs ``steps`` steps of every
    variant in turn, so that a machine whose load changes during the run slows
    all of them alike.  The step batches are fixed (the same for every variant),
    drawn from the training pairs.
    """
    import statistics

    import torch

    from actstore.store import open as open_store

    rng = random.Random(seed)
    n = len(all_pairs)
    batches = [rng.sample(list(train_idx), min(batch_size, len(train_idx))) for _ in range(steps)]
    qs, ans = all_pairs.questions, all_pairs.answers
    variants: list[_Variant] = []
    opened: list[Any] = []

    full_model = model_factory()
    full_model.train()
    tok = Tokenize(full_model)
    opt_full = torch.optim.AdamW(full_model.parameters(), lr=1e-9)

    def full_step(idx: list[int]) -> None:
        q = full_model(tok([qs[i] for i in idx]))["sentence_embedding"]
        a = full_model(tok([ans[i] for i in idx]))["sentence_embedding"]
        loss = mnrl_loss(q, a)
        optimizer_step(opt_full, loss)

    variants.append(_Variant("full", full_step))

    for at, path in stores.items():
        store = open_store(path)
        opened.append(store)
        step, head, opt = _recompute(model_factory, at, all_pairs)
        variants.append(_Variant(f"recompute@{at:g}", step))
        variants.append(_Variant(f"recycled@{at:g}", _from_store(StoreRows(store, layer_field(store)), n, head, opt)))

    if head_store is not None:
        store = open_store(head_store)
        opened.append(store)
        step, skip, opt_h = _head_recompute(model_factory, all_pairs)
        variants.append(_Variant("head-recompute", step))
        variants.append(_Variant("head-recycled", _from_store(StoreRows(store, layer_field(store)), n, skip, opt_h)))

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for v in variants:  # warm-up: one step each
            v.step(batches[0])
        for _ in progress_bar(range(rounds), "interleaved timing", progress, total=rounds):
            for v in variants:
                for idx in batches:
                    t0 = time.perf_counter()
                    v.step(idx)
                    times[v.name].append(time.perf_counter() - t0)
    finally:
        for store in opened:
            store.close()
    return {name: statistics.median(ts) for name, ts in times.items()}

