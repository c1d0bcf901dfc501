"""The FAQ study's training runs, step by step: full fine-tuning, recycled blocks, head only.

A :class:`Training` is a prepared run — the module that trains, its optimiser
and schedule, and every epoch's batches drawn from its seed — that advances one
optimiser step at a time and times each step.  Each run keeps its own torch
random state (dropout), swapped in around its steps, so it gives the same
numbers whether it runs alone (:func:`run_alone`) or in turn with other runs
(:func:`actstore.examples.faq.interleave.run_interleaved`).

- :func:`prepare_full` / :func:`train_full`: every layer trained;
- :func:`prepare_recycled` / :func:`train_recycled`: the first encoder blocks'
  per-token output precomputed into a store, the upper blocks plus pooling
  trained from it;
- :func:`prepare_head_only` / :func:`train_head_only`: the whole model's
  sentence embedding precomputed into a store, a new skip-connection head
  trained on it ("head only": every block frozen, only a head on the model's
  output trains).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actstore.examples.faq.data import Pairs
from actstore.examples.faq.loops import (
    StoreRows,
    apply_head,
    count_params,
    epoch_batches,
    evaluate_from_store,
    evaluate_model,
    layer_field,
    optimizer,
    optimizer_step,
    precompute_texts,
    progress_bar,
    record_epoch,
    store_bytes,
)
from actstore.examples.faq.losses import mnrl_loss
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.model import LoraSpec, SkipConnectionHead, Tokenize, blocks_frozen, embedding_dim
from actstore.models.split import split

__all__ = ["Training", "prepare_full", "prepare_head_only", "prepare_recycled", "run_alone", "train_full",
           "train_head_only", "train_recycled"]


def _nothing() -> None:
    return None


@dataclass
class Training:
    """A training run advanced one optimiser step at a time (see the module's docstring).

    ``epochs[e]`` lists epoch ``e``'s batches (lists of pair indices); ``loss_of(batch)``
    returns the batch's loss with gradients; ``evaluate()`` fills ``row``'s metrics.
    ``rng_state`` is the torch CPU random state the run's steps draw from.
    """

    row: RowResult
    module: Any
    loss_of: Callable[[list[int]], Any]
    opt: Any
    sched: Any
    epochs: list[list[list[int]]]
    evaluate: Callable[[], None]
    rng_state: Any
    eval_each_epoch: bool = False
    log: Callable[[str], None] = print
    on_close: Callable[[], None] = _nothing
    #: Seconds of every step taken, in order (the forward, backward and update; no evaluation).
    step_seconds: list[float] = field(default_factory=list)
    _epoch: int = 0
    _index: int = 0
    _losses: list[float] = field(default_factory=list)
    _finished: bool = False
    _closed: bool = False

    @property
    def batches(self) -> list[list[int]]:
        """Every step's batch, in the order the steps take them (a new list; the batches are not copied)."""
        return [b for epoch in self.epochs for b in epoch]

    @property
    def total_steps(self) -> int:
        """Steps of every epoch together."""
        return sum(len(e) for e in self.epochs)

    @property
    def done(self) -> bool:
        """Whether every step has been taken (:meth:`finish` still evaluates)."""
        return self._epoch >= len(self.epochs)

    def step(self) -> float:
        """Take the next optimiser step; return its seconds.

        At the end of an epoch, records it in ``row.epoch_seconds`` (the sum of
        its steps' seconds) and, with ``eval_each_epoch``, evaluates.
        """
        import torch

        if self.done:
            raise RuntimeError(f"{self.row.name}: every step of the run has been taken")
        batch = self.epochs[self._epoch][self._index]
        saved = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            self.module.train()
            t0 = time.perf_counter()
            loss = self.loss_of(batch)
            optimizer_step(self.opt, loss)
            self.sched.step()
            value = float(loss.detach())
            seconds = time.perf_counter() - t0
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)
        self.step_seconds.append(seconds)
        self._losses.append(value)
        self._index += 1
        if self._index == len(self.epochs[self._epoch]):
            self._end_epoch()
        return seconds

    def _end_epoch(self) -> None:
        n = len(self.epochs[self._epoch])
        self.row.epoch_seconds.append(sum(self.step_seconds[-n:]))
        last = self._epoch == len(self.epochs) - 1
        self._epoch += 1
        self._index = 0
        if self.eval_each_epoch:
            self._evaluate()
            self._record(log_time=True)
        elif not last:
            self._record(log_time=False, log=False)

    def _evaluate(self) -> None:
        self.evaluate()  # (adds its seconds to row.eval_seconds)

    def _record(self, *, log_time: bool, log: bool = True) -> None:
        row, losses = self.row, self._losses
        record_epoch(row, losses, self.log if log and log_time else None)
        self._losses = []
        if log and not log_time:
            self.log(f"  {row.name}: trained {len(row.history)} epoch(s); the last epoch's mean loss "
                     f"{row.history[-1]['loss']:.4f}")

    def close(self) -> None:
        """Release what the run holds (its store); a second call does nothing."""
        if not self._closed:
            self._closed = True
            self.on_close()

    def finish(self) -> RowResult:
        """Evaluate after the last epoch (unless each epoch was), put the module in eval mode, close; the row."""
        if not self.done:
            raise RuntimeError(f"{self.row.name}: {self.total_steps - len(self.step_seconds)} steps are left")
        if not self._finished:
            self._finished = True
            try:
                if not self.eval_each_epoch:
                    self._evaluate()
                    self._record(log_time=False)
                self.module.eval()
            finally:
                self.close()
        return self.row


def run_alone(training: Training, *, progress: bool = True) -> RowResult:
    """Run ``training`` to its end (a progress bar per epoch) and finish it; its row."""
    try:
        for e, epoch in enumerate(training.epochs):
            for _ in progress_bar(epoch, f"{training.row.name} epoch {e + 1}/{len(training.epochs)}", progress):
                training.step()
    except BaseException:
        training.close()
        raise
    return training.finish()


def _draw_epochs(n: int, epochs: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [epoch_batches(n, batch_size, rng) for _ in range(epochs)]


# -- full fine-tuning ---------------------------------------------------------------------


def prepare_full(model: Any, train: Pairs, val: Pairs, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
                 progress: bool = True, name: str = "full fine-tuning", eval_each_epoch: bool = False,
                 lora: LoraSpec | None = None, log: Callable[[str], None] = print) -> Training:
    """Prepare fine-tuning every layer of ``model`` on the training pairs (see :func:`train_full`)."""
    import torch

    torch.manual_seed(seed)
    tok = Tokenize(model)
    if lora is not None:
        lora.apply(model[0].auto_model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _draw_epochs(len(train), epochs, batch_size, seed)
    opt, sched = optimizer(params, lr, sum(len(e) for e in batches))
    row = RowResult(name, frozen_blocks=0, epochs=epochs, trainable_params=count_params(params))

    def pair_loss(idx: list[int]) -> Any:
        q = model(tok([train.questions[i] for i in idx]))["sentence_embedding"]
        a = model(tok([train.answers[i] for i in idx]))["sentence_embedding"]
        return mnrl_loss(q, a)

    def evaluate() -> None:
        evaluate_model(model, val, row, progress=progress)

    return Training(row, model, pair_loss, opt, sched, batches, evaluate, torch.get_rng_state(),
                    eval_each_epoch=eval_each_epoch, log=log)


def train_full(model: Any, train: Pairs, val: Pairs, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
               progress: bool = True, name: str = "full fine-tuning", eval_each_epoch: bool = False,
               lora: LoraSpec | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Fine-tune every layer of ``model`` on the training pairs; evaluate after the last epoch (or each).

    With ``lora`` (a :class:`LoraSpec`), LoRA adapters go on the whole
    transformer and only they train.
    """
    return run_alone(prepare_full(model, train, val, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                  progress=progress, name=name, eval_each_epoch=eval_each_epoch, lora=lora, log=log),
                     progress=progress)


# -- from a store: recycled blocks, head only -----------------------------------------------


def _from_store(head: Any, params: list[Any], gather: StoreRows, store: Any, all_pairs: Pairs, train_idx: list[int],
                val_idx: list[int], *, row: RowResult, epochs: int, batch_size: int, lr: float, seed: int,
                progress: bool, eval_each_epoch: bool, log: Callable[[str], None]) -> Training:
    import torch

    torch.manual_seed(seed)
    n = len(all_pairs)
    batches = _draw_epochs(len(train_idx), epochs, batch_size, seed)
    opt, sched = optimizer(params, lr, sum(len(e) for e in batches))

    def pair_loss(idx: list[int]) -> Any:
        qi, ai = gather([train_idx[i] for i in idx]), gather([n + train_idx[i] for i in idx])
        return mnrl_loss(apply_head(head, qi), apply_head(head, ai))

    def evaluate() -> None:
        evaluate_from_store(head, gather, all_pairs, val_idx, row, progress=progress)

    return Training(row, head, pair_loss, opt, sched, batches, evaluate, torch.get_rng_state(),
                    eval_each_epoch=eval_each_epoch, log=log, on_close=store.close)


def prepare_recycled(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], at: float,
                     store_path: str, *, epochs: int, batch_size: int, lr: float, store_dtype: str = "float16",
                     seed: int = 0, progress: bool = True, name: str | None = None, lora: LoraSpec | None = None,
                     reuse: bool = False, quantize: str | None = None, eval_each_epoch: bool = True,
                     log: Callable[[str], None] = print) -> Training:
    """Precompute the first ``at`` of the encoder blocks into a store; prepare training the rest from it.

    See :func:`train_recycled`.  The run closes the store when it finishes.
    """

    frozen, head = split(model, at)
    k = blocks_frozen(model, at)
    row = RowResult(name or f"{round(at * 100)}% recycling", frozen_blocks=k, epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, str(frozen.at), store_dtype=store_dtype,
                                                     progress=progress, overwrite=not reuse, quantize=quantize)
    row.disk_bytes = store_bytes(store)
    log(f"  {row.name}: precomputed {len(texts):,} texts at {frozen.at}")
    try:
        for p in frozen.parameters():
            p.requires_grad_(False)
        if lora is not None:
            head = lora.apply(head)
        params = [p for p in head.parameters() if p.requires_grad]
        row.trainable_params = count_params(params)
        gather = StoreRows(store, layer_field(store))
        return _from_store(head, params, gather, store, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                           batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                           eval_each_epoch=eval_each_epoch, log=log)
    except BaseException:
        store.close()
        raise


def train_recycled(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], at: float, store_path: str,
                   *, epochs: int, batch_size: int, lr: float, store_dtype: str = "float16", seed: int = 0,
                   progress: bool = True, name: str | None = None, lora: LoraSpec | None = None,
                   reuse: bool = False, quantize: str | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Recycle the first ``at`` of the encoder blocks: precompute their per-token output, train the rest from it.

    The store holds every question and answer of ``all_pairs`` (training and
    validation): validation is evaluated from the store too, after each epoch.
    With ``lora``, LoRA adapters go on the head and only they train. With
    ``reuse``, a store already at ``store_path`` (same model, split and texts)
    is resumed, so nothing is recomputed.  ``quantize`` stores the states
    quantised (``"int8"``), read back dequantised into ``store_dtype``.
    """
    return run_alone(prepare_recycled(model, all_pairs, train_idx, val_idx, at, store_path, epochs=epochs,
                                      batch_size=batch_size, lr=lr, store_dtype=store_dtype, seed=seed,
                                      progress=progress, name=name, lora=lora, reuse=reuse, quantize=quantize,
                                      log=log), progress=progress)


def prepare_head_only(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], store_path: str, *,
                      epochs: int, batch_size: int, lr: float, store_dtype: str = "float32", seed: int = 0,
                      progress: bool = True, name: str = "head only", reuse: bool = False,
                      eval_each_epoch: bool = True, log: Callable[[str], None] = print) -> Training:
    """Precompute the sentence embedding into a store; prepare training a skip-connection head on it."""
    import torch

    row = RowResult(name, frozen_blocks=blocks_frozen(model, 1.0), epochs=epochs)
    texts = all_pairs.questions + all_pairs.answers
    store, row.precompute_seconds = precompute_texts(model, texts, store_path, None, store_dtype=store_dtype,
                                                     progress=progress, overwrite=not reuse)
    row.disk_bytes = store_bytes(store)
    log(f"  {name}: precomputed {len(texts):,} sentence embeddings")
    try:
        gather = StoreRows(store, layer_field(store))
        torch.manual_seed(seed)
        head = SkipConnectionHead(embedding_dim(model))
        params = list(head.parameters())
        row.trainable_params = count_params(params)
        return _from_store(head, params, gather, store, all_pairs, train_idx, val_idx, row=row, epochs=epochs,
                           batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                           eval_each_epoch=eval_each_epoch, log=log)
    except BaseException:
        store.close()
        raise


def train_head_only(model: Any, all_pairs: Pairs, train_idx: list[int], val_idx: list[int], store_path: str, *,
                    epochs: int, batch_size: int, lr: float, store_dtype: str = "float32", seed: int = 0,
                    progress: bool = True, name: str = "head only", reuse: bool = False,
                    log: Callable[[str], None] = print) -> RowResult:
    """Cache the whole model's sentence embedding; train a skip-connection head on it (``reuse``: see train_recycled).

    Evaluated from the store after each epoch.
    """
    return run_alone(prepare_head_only(model, all_pairs, train_idx, val_idx, store_path, epochs=epochs,
                                       batch_size=batch_size, lr=lr, store_dtype=store_dtype, seed=seed,
                                       progress=progress, name=name, reuse=reuse, log=log), progress=progress)
