"""The FAQ study's building blocks: batches, the optimiser, evaluation, and reading the stores.

- :func:`evaluate_model` fills a row's metrics from the model itself (no training);
- :func:`precompute_texts` fills a store from a model over texts; :class:`StoreRows`
  gathers padded batches of text positions from it, and :func:`encode_from_store`
  runs a head over them (the store-backed rows evaluate from the store: the
  validation texts are in it).

The training runs themselves are in :mod:`.runs` (one run alone) and
:mod:`.interleave` (several runs in turn, timed round by round).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from actstore.examples.faq.data import Pairs, corpus
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.model import Tokenize

__all__ = ["StoreRows", "apply_head", "count_params", "encode_from_store", "epoch_batches", "evaluate_from_store",
           "evaluate_model", "layer_field", "optimizer", "optimizer_step", "precompute_texts", "progress_bar", "store_bytes"]


# -- shared by the runs and the step timing ------------------------------------------------


def progress_bar(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    """``iterable`` wrapped in a tqdm bar that clears when done, or ``iterable`` itself when not ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of ``range(n)``, shuffled by ``rng``; a last partial batch is dropped (n < batch_size: one batch)."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]


def optimizer(params: list[Any], lr: float, steps: int, warmup: float = 0.1) -> tuple[Any, Any]:
    """AdamW (weight decay 0.01) and its schedule: linear warm-up over ``warmup`` of ``steps``, then linear decay."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(steps * warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def count_params(params: list[Any]) -> int:
    """How many numbers ``params`` hold."""
    return sum(p.numel() for p in params)


def record_epoch(row: RowResult, losses: list[float], log: Callable[[str], None] | None = None) -> None:
    """Append the epoch just trained (its mean loss, the row's current RP@1 and RRK) to ``row.history``; log it."""
    row.history.append({"epoch": len(row.history) + 1, "loss": sum(losses) / len(losses), "rp1": row.rp1,
                        "rrk": row.rrk})
    if log is not None:
        log(f"  {row.name}: epoch {len(row.history)} {row.epoch_seconds[-1]:.1f} s, loss "
            f"{row.history[-1]['loss']:.4f}, RP@1 {row.rp1:.4f}, RRK {row.rrk:.4f}")


def optimizer_step(opt: Any, loss: Any) -> None:
    """One training step: clear the gradients, backpropagate ``loss``, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# -- encoding and evaluation --------------------------------------------------------------


def _encode_texts(model: Any, texts: Sequence[str], batch_size: int = 128, bar: Any = None) -> Any:
    import torch

    tok = Tokenize(model)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            out.append(model(tok(chunk))["sentence_embedding"])
            if bar is not None:
                bar.update(len(chunk))
    model.train(was_training)
    return torch.cat(out)


def _texts_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", leave=False, dynamic_ncols=True)


def evaluate_model(model: Any, val: Pairs, row: RowResult, batch_size: int = 128, *, progress: bool = False) -> RowResult:
    """Fill ``row``'s metrics from ``model`` run on the validation pairs (questions vs distinct answers).

    ``progress`` shows a bar over the texts encoded (questions, then the distinct answers).
    """
    t0 = time.perf_counter()
    answers, relevant = corpus(val.answers)
    bar = _texts_bar(len(val) + len(answers), f"evaluating {row.name}", progress)
    try:
        q = _encode_texts(model, val.questions, batch_size, bar)
        a = _encode_texts(model, answers, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    row.set_metrics(q, a[relevant], a, relevant)
    row.eval_seconds += time.perf_counter() - t0
    return row


def encode_from_store(head: Any, gather: StoreRows, positions: Sequence[int], batch_size: int = 256, *,
                      bar: Any = None) -> Any:
    """``head`` (in eval mode, no gradients) over the stored rows of text ``positions``; always a new tensor."""
    import torch

    was = head.training
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(positions), batch_size):
            chunk = positions[i : i + batch_size]
            out.append(apply_head(head, gather(chunk)))
            if bar is not None:
                bar.update(len(chunk))
    head.train(was)
    return torch.cat(out)


def evaluate_from_store(head: Any, gather: StoreRows, all_pairs: Pairs, val_idx: Sequence[int], row: RowResult, *,
                        progress: bool = False) -> RowResult:
    """Fill ``row``'s metrics from ``head`` over the store's rows of the validation pairs.

    The store holds the texts of ``all_pairs``: questions at positions ``0..n-1``,
    answers at ``n..2n-1``; the corpus is the validation pairs' distinct answers.
    """
    t0 = time.perf_counter()
    n = len(all_pairs)
    val = all_pairs.subset(val_idx)
    answers, relevant = corpus(val.answers)
    first_answer = {a: val_idx[i] for i, a in reversed(list(enumerate(val.answers)))}
    corpus_pos = [n + first_answer[a] for a in answers]
    bar = _texts_bar(len(val_idx) + len(corpus_pos), f"evaluating {row.name}", progress)
    try:
        q = encode_from_store(head, gather, list(val_idx), bar=bar)
        a = encode_from_store(head, gather, corpus_pos, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    row.set_metrics(q, a[relevant], a, relevant)
    row.eval_seconds += time.perf_counter() - t0
    return row


# -- stores -------------------------------------------------------------------------------


def precompute_texts(model: Any, texts: Sequence[str], path: str, layer: str | None, *, store_dtype: str | None,
                     batch_size: int = 128, progress: bool = True, overwrite: bool = True,
                     quantize: str | None = None) -> tuple[Any, float]:
    """Precompute ``layer`` (None: the sentence embedding) of ``model`` over ``texts`` into a new store.

    ``overwrite=False`` resumes a store already at ``path`` (texts it holds are
    not recomputed). Returns the store and the wall time of the precompute.
    """
    from actstore.precompute.api import precompute

    t0 = time.perf_counter()
    store = precompute(model, list(texts), path, layers=None if layer is None else [layer],
                       collate_fn=Tokenize(model), batch_size=batch_size, store_dtype=store_dtype,
                       quantize=quantize, progress=progress, overwrite=overwrite)
    return store, time.perf_counter() - t0


class StoreRows:
    """Gather text positions from a precompute store: padded (values, mask) per batch."""

    def __init__(self, store: Any, field_name: str) -> None:
        import torch

        from actstore.training.collate import ActivationCollate
        from actstore.training.datasets import ActivationDataset

        self.store = store
        self.rows = store.view("dataset")
        self.ds = ActivationDataset(store, fields=[field_name])
        self.collate = ActivationCollate(torch.float32, mask_dtype=torch.int64)
        self.field = field_name

    def __call__(self, positions: Sequence[int]) -> Any:
        batch = self.collate(self.ds.__getitems__(self.rows[list(positions)].tolist()))
        return batch[self.field]


def apply_head(head: Any, got: Any) -> Any:
    """Run ``head`` on what :class:`StoreRows` gathered: ``(values, mask)`` of a padded batch, or one tensor."""
    if isinstance(got, tuple):  # PaddedBatch: values, mask, lengths
        return head(got[0], got[1])
    return head(got)


def layer_field(store: Any) -> str:
    """The name of the store's one activation field (fields named ``item_*`` hold side values)."""
    names = [n for n in store.fields if not n.startswith("item_")]
    if len(names) != 1:
        raise RuntimeError(f"expected one activation field in the store, got {sorted(store.fields)}")
    return names[0]


def store_bytes(store: Any) -> int:
    """The store's size on disk, in bytes."""
    return int(store.info()["bytes_on_disk"])


