"""PyTorch Lightning: ``lightning.Trainer`` with a small ``LightningModule``, recycled by one line.

The ``LightningModule`` holds the (recycled) model as a submodule; Lightning
moves it, switches train/eval mode and runs the loop as for any model.
"""

from __future__ import annotations

from typing import Any

import lightning
import torch

import actstore
from actstore.examples.recycle.data import EpochHook, Run, end_epoch, shuffled_loader


class Classifier(lightning.LightningModule):
    """A task model (returning ``.loss`` when given ``labels``) trained with AdamW."""

    def __init__(self, model: Any, run: Run, lr: float, on_epoch_end: EpochHook | None) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self._run, self._hook = run, on_epoch_end

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self._run.losses.append(float(loss.detach()))
        return loss  # type: ignore[no-any-return]

    def on_train_epoch_end(self) -> None:
        end_epoch(self._run, self._hook, self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)


def train(model: Any, items: list[dict[str, Any]], store: str | None, *, out_dir: str,
          at: float | str = 0.5, epochs: int = 2, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
          on_epoch_end: EpochHook | None = None) -> Run:
    """Train ``model`` (a task model returning ``.loss``) on ``items``; with ``store``, recycled at ``at``."""
    if store is not None:
        model = actstore.recycle(model, at, store)  # the one line
    loader = shuffled_loader(items, batch_size, seed)
    run = Run(model)
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=out_dir)
    trainer.fit(Classifier(model, run, lr, on_epoch_end), loader)
    if store is not None:
        model.close()
    return run
