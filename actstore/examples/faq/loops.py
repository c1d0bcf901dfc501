"""The FAQ study's training runs: evaluate, fine-tune fully, or train from a store (recycled blocks, head only).

- :func:`evaluate_model` fills a row's metrics from the model itself (no training);
- :func:`train_full` fine-tunes every layer;
- :func:`train_recycled` precomputes the first encoder blocks' per-token output
  into a store and trains the upper blocks plus pooling from it;
- :func:`train_head_only` caches the sentence embedding and trains a
  skip-connection head on it.

The two store-backed runs evaluate from the store too: the validation texts are
in it (the store holds every question and answer of the pairs it was given).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from actstore.examples.faq.data import Pairs, corpus
from actstore.examples.faq.losses import mnrl_loss
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.model import LoraSpec, SkipConnectionHead, Tokenize, blocks_frozen, embedding_dim

__all__ = ["StoreRows", "apply_head", "evaluate_model", "layer_field", "precompute_texts", "train_full", "train_head_only",
           "train_recycled"]


# -- shared by the runs and the step timing ------------------------------------------------


def progress_bar(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]


def optimizer(params: list[Any], lr: float, steps: int, warmup: float = 0.1) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, int(steps * warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def count_params(params: list[Any]) -> int:
    return sum(p.numel() for p in params)



def optimizer_step(opt: Any, loss: Any) -> None:
    """One training step: clear the gradients, backpropagate ``loss``, update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _epoch(batches: list[list[int]], loss_of: Callable[[list[int]], Any], opt: Any, sched: Any, *,
           progress_bar_desc: str, progress: bool) -> list[float]:
    """One epoch: a step on each batch of pair indices; returns the losses."""
    losses = []
    for idx in progress_bar(batches, progress_bar_desc, progress):
        loss = loss_of(idx)
        optimizer_step(opt, loss)
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def _record_epoch(row: RowResult, losses: list[float], log: Callable[[str], None]) -> None:
    """Append the epoch just evaluated to ``row.history`` and log it."""
    row.history.append({"epoch": len(row.history) + 1, "loss": sum(losses) / len(losses), "rp1": row.rp1,
                        "rrk": row.rrk})
    log(f"  {row.name}: epoch {len(row.history)} {row.epoch_seconds[-1]:.1f} s, loss {row.history[-1]['loss']:.4f}, "
        f"RP@1 {row.rp1:.4f}, RRK {row.rrk:.4f}")


# -- encoding and evaluation --------------------------------------------------------------


def _encode_texts(model: Any, texts: Sequence[str], batch_size: int = 128) -> Any:
    import torch

    tok = Tokenize(model)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(model(tok(texts[i : i + batch_size]))["sentence_embedding"])
    model.train(was_training)
    return torch.cat(out)


def evaluate_model(model: Any, val: Pairs, row: RowResult, batch_size: int = 128) -> RowResult:
    """Fill ``row``'s metrics from ``model`` run on the validation pairs (questions vs distinct answers)."""
    t0 = time.perf_counter()
    answers, relevant = corpus(val.answers)
    q = _encode_texts(model, val.questions, batch_size)
    a = _encode_texts(model, answers, batch_size)
    row.set_metrics(q, a[relevant], a, relevant)
    row.eval_seconds += time.perf_counter() - t0
    return row


# -- full fine-tuning ---------------------------------------------------------------------


def train_full(model: Any, train: Pairs, val: Pairs, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
               progress: bool = True, name: str = "full fine-tuning", eval_each_epoch: bool = False,
               lora: LoraSpec | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Fine-tune every layer of ``model`` on the training pairs; evaluate after the last epoch (or each).

    With ``lora`` (a :class:`LoraSpec`), LoRA adapters go on the whole
    transformer and only they train.
    """
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = Tokenize(model)
    if lora is not None:
        lora.apply(model[0].auto_model)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = epochs * len(epoch_batches(len(train), batch_size, random.Random(0)))
    opt, sched = optimizer(params, lr, steps)
    row = RowResult(name, frozen_blocks=0, epochs=epochs, trainable_params=count_params(params))

    def pair_loss(idx: list[int]) -> Any:
        q = model(tok([train.questions[i] for i in idx]))["sentence_embedding"]
        a = model(tok([train.answers[i] for i in idx]))["sentence_embedding"]
        return mnrl_loss(q, a)

    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        losses = _epoch(epoch_batches(len(train), batch_size, rng), pair_loss, opt, sched,
                        progress_bar_desc=f"{name} epoch {epoch + 1}/{epochs}", progress=progress)
        row.epoch_seconds.append(time.perf_counter() - t0)
        if eval_each_epoch or epoch == epochs - 1:
            evaluate_model(model, val, row)
        _record_epoch(row, losses, log)
    model.eval()
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
    names = [n for n in store.fields if not n.startswith("item_")]
    if len(names) != 1:
        raise RuntimeError(f"expected one activation field in the store, got {sorted(store.fields)}")
    return names[0]


def store_bytes(store: Any) -> int:
    return int(store.info()["bytes_on_disk"])


# -- recycling: train the upper blocks from the store ------------------------------------


def _encode_from_store(head: Any, gather: StoreRows, positions: Sequence[int], batch_size: int = 256) -> Any:
    import torch

    was = head.training
    head.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(positions), batch_size):
            got = gather(positions[i : i + batch_size])
            out.append(apply_head(head, got))
    head.train(was)
    return torch.cat(out)


def _train_from_store(head: Any, params: list[Any], gather: StoreRows, all_pairs: Pairs, train_idx: list[int],
                      val_idx: list[int], *, row: RowResult, epochs: int, batch_size: int, lr: float, seed: int,
                      progress: bool, log: Callable[[str], None]) -> RowResult:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    n = len(all_pairs)
    steps = epochs * len(epoch_batches(len(train_idx), batch_size, random.Random(0)))
    opt, sched = optimizer(params, lr, steps)
    val = all_pairs.subset(val_idx)
    answers, relevant = corpus(val.answers)
    first_answer = {a: val_idx[i] for i, a in reversed(list(enumerate(val.answers)))}
    corpus_pos = [n + first_answer[a] for a in answers]

    def pair_loss(idx: list[int]) -> Any:
        qi, ai = gather([train_idx[i] for i in idx]), gather([n + train_idx[i] for i in idx])
        return mnrl_loss(apply_head(head, qi), apply_head(head, ai))

    for epoch in range(epochs):
        head.train()
        t0 = time.perf_counter()
        losses = _epoch(epoch_batches(len(train_idx), batch_size, rng), pair_loss, opt, sched,
                        progress_bar_desc=f"{row.name} epoch {epoch + 1}/{epochs}", progress=progress)
        row.epoch_seconds.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        q = _encode_from_store(head, gather, list(val_idx))
        a = _encode_from_store(head, gather, corpus_pos)
        row.set_metrics(q, a[relevant], a, relevant)
        row.eval_seconds += time.perf_counter() - t1
        _record_epoch(row, losses, log)
    head.eval()
    return row


def train_recycled(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], at: float, store_path: str,
                   *, epochs: int, batch_size: int, lr: float, store_dtype: str = "float16", seed: int = 0,
                   progress: bool = True, name: str | None = None, lora: LoraSpec | None = None,
                   reuse: bool = False, quantize: str | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Recycle the first ``at`` of the encoder blocks: precompute their per-token output, train the rest from it.

    The store holds every question and answer of ``all_pairs`` (training and
    validation): validation is evaluated from the store too. With ``lora``,
    LoRA adapters go on the head and only they train. With ``reuse``, a store
    already at ``store_path`` (same model, split and texts) is resumed, so
    nothing is recomputed.  ``quantize`` stores the states quantised (``"int8"``),
    read back dequantised into ``store_dtype``.
    """
    from actstore.models.split import split

    frozen, head = split(model, at)
    k = blocks_frozen(model, at)
    row = RowResult(name or f"{round(at * 100)}% recycling", frozen_blocks=k, epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, str(frozen.at), store_dtype=store_dtype,
                                                     progress=progress, overwrite=not reuse, quantize=quantize)
    row.disk_bytes = store_bytes(store)
    log(f"  {row.name}: precomputed {len(texts):,} texts at {frozen.at} in {row.precompute_seconds:.1f} s, "
        f"{row.disk_bytes / 1e6:.1f} MB on disk")
    for p in frozen.parameters():
        p.requires_grad_(False)
    if lora is not None:
        head = lora.apply(head)
    params = [p for p in head.parameters() if p.requires_grad]
    row.trainable_params = count_params(params)
    gather = StoreRows(store, layer_field(store))
    try:
        return _train_from_store(head, params, gather, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=log)
    finally:
        store.close()


def train_head_only(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], store_path: str, *,
                    epochs: int, batch_size: int, lr: float, store_dtype: str = "float32", seed: int = 0,
                    progress: bool = True, name: str = "head only", reuse: bool = False,
                    log: Callable[[str], None] = print) -> RowResult:
    """Cache the whole model's sentence embedding; train a skip-connection head on it (``reuse``: see train_recycled)."""
    import torch

    row = RowResult(name, frozen_blocks=blocks_frozen(model, 1.0), epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, None, store_dtype=store_dtype,
                                                     progress=progress, overwrite=not reuse)
    row.disk_bytes = store_bytes(store)
    log(f"  {name}: precomputed {len(texts):,} sentence embeddings in {row.precompute_seconds:.1f} s, "
        f"{row.disk_bytes / 1e6:.1f} MB on disk")
    gather = StoreRows(store, layer_field(store))
    torch.manual_seed(seed)
    head = SkipConnectionHead(embedding_dim(model))
    params = list(head.parameters())
    row.trainable_params = count_params(params)
    try:
        return _train_from_store(head, params, gather, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=progress, log=log)
    finally:
        store.close()

