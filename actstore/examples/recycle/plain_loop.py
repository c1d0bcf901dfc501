"""A plain PyTorch training loop, recycled by one line."""

from __future__ import annotations

from typing import Any

import torch

import actstore
from actstore.examples.recycle.data import EpochHook, Run, end_epoch, shuffled_loader


def train(model: Any, items: list[dict[str, Any]], store: str | None, *, at: float | str = 0.5,
          epochs: int = 2, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
          on_epoch_end: EpochHook | None = None) -> Run:
    """Train ``model`` (a task model returning ``.loss``) on ``items``; with ``store``, recycled at ``at``."""
    if store is not None:
        model = actstore.recycle(model, at, store)  # the one line
    loader = shuffled_loader(items, batch_size, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    run = Run(model)
    model.train()
    for epoch in range(epochs):
        for batch in loader:
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            run.losses.append(float(loss.detach()))
        end_epoch(run, on_epoch_end, epoch)
    if store is not None:
        model.close()
    return run
