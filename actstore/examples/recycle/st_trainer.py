"""``SentenceTransformerTrainer`` on (anchor, positive) text columns, recycled by one line.

The loss is ``MultipleNegativesRankingLoss`` (in-batch negatives) or
``CachedMultipleNegativesRankingLoss`` (GradCache: embeddings first without
grad in mini-batches, then again with grad; both passes are served from the
store once a text has been seen).  The model is any ``SentenceTransformer``
(all-MiniLM-L6-v2 in the tests: ``actstore.examples.faq.model.load_minilm``).
"""

from __future__ import annotations

from typing import Any

import datasets
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer import losses

import actstore
from actstore.examples.recycle.data import EpochHook, Run
from actstore.examples.recycle.hf_trainer import EpochsCallback


def make_loss(model: Any, loss: str, mini_batch_size: int = 4) -> Any:
    """``"mnrl"``: ``MultipleNegativesRankingLoss``; ``"cached"``: ``CachedMultipleNegativesRankingLoss``."""
    if loss == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if loss == "cached":
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    raise ValueError(f"make_loss: loss must be 'mnrl' or 'cached'; got {loss!r}")


def train(model: Any, columns: dict[str, list[str]], store: str | None, *, out_dir: str,
          loss: str = "mnrl", at: float | str = 0.5, epochs: int = 2, batch_size: int = 8, lr: float = 2e-5,
          seed: int = 0, max_steps: int = -1, on_epoch_end: EpochHook | None = None) -> Run:
    """Train a ``SentenceTransformer`` on ``columns`` (``anchor``, ``positive``); with ``store``, recycled at ``at``.

    The recycled model is closed at the end (store committed and released, its
    plain class back); ``Run.model`` is the trained model, the same object.
    """
    if store is not None:
        model = actstore.recycle(model, at, store)  # the one line
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
        max_steps=max_steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=seed)
    run = Run(model)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(columns),
                                         loss=make_loss(model, loss), callbacks=[EpochsCallback(run, on_epoch_end)])
    trainer.train()
    if store is not None:
        model.close()
    return run
