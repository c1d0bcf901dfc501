"""``transformers.Trainer`` on a task model, recycled by one line.

The script is the usual one: a ``*ForSequenceClassification`` model, tokenised
items with ``labels``, ``Trainer``'s default data collator and its default
``remove_unused_columns=True`` (which inspects ``model.forward``'s signature: a
recycled model keeps its class's own ``forward``).
"""

from __future__ import annotations

from typing import Any

import transformers

import actstore
from actstore.examples.recycle.data import EpochHook, Run, end_epoch


class EpochsCallback(transformers.TrainerCallback):
    """Records each logged loss in ``run.losses`` and ends each epoch with :func:`end_epoch` (any HF-style trainer)."""

    def __init__(self, run: Run, on_epoch_end: EpochHook | None) -> None:
        self.run, self.hook = run, on_epoch_end

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.run.losses.append(float(logs["loss"]))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        end_epoch(self.run, self.hook, round(state.epoch or 1) - 1)


def train(model: Any, items: list[dict[str, Any]], store: str | None, *, out_dir: str,
          at: float | str = 0.5, epochs: int = 2, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
          on_epoch_end: EpochHook | None = None) -> Run:
    """Train ``model`` on ``items`` with ``Trainer`` for ``epochs``; with ``store``, recycled at ``at``.

    The recycled model is closed at the end (its store committed and released,
    its plain class back); ``Run.model`` is the trained model, the same object.
    """
    if store is not None:
        model = actstore.recycle(model, at, store)  # the one line
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed)
    run = Run(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=items, callbacks=[EpochsCallback(run, on_epoch_end)])
    trainer.train()
    if store is not None:
        model.close()
    return run
