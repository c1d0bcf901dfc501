"""Small models and data for the recycling examples: a BERT classifier from a config, tokeniser-style items."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: Called at the end of each epoch with its number (0-based): tests read counters there.
EpochHook = Callable[[int], None]


@dataclass
class Run:
    """What a recycling example's training returns."""

    model: Any
    losses: list[float] = field(default_factory=list)  # per optimizer step (per micro-batch for the trainers' logs)
    epochs: list[dict[str, int]] = field(default_factory=list)  # model.recycle_stats at each epoch's end (recycled)


def end_epoch(run: Run, hook: EpochHook | None, epoch: int) -> None:
    """Record ``run.model``'s ``recycle_stats`` (when it is recycled) and call ``hook(epoch)``."""
    stats = getattr(run.model, "recycle_stats", None)
    if stats is not None:
        run.epochs.append(dict(stats))
    if hook is not None:
        hook(epoch)


def shuffled_loader(items: list[dict[str, Any]], batch_size: int, seed: int) -> Any:
    """A ``DataLoader`` over ``items`` shuffled by a generator seeded with ``seed`` (the same order in every run)."""
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=True,  # type: ignore[arg-type]
                                       generator=torch.Generator().manual_seed(seed))


def bert_classifier(seed: int = 0, num_labels: int = 3, dropout: float = 0.0) -> Any:
    """A small ``BertForSequenceClassification`` from a config (random weights, no download).

    ``dropout=0.0`` (default) makes a training step deterministic, so a recycled
    run can be compared with a plain one parameter for parameter.
    """
    import transformers

    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # type: ignore[call-arg]
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def token_items(n: int = 48, width: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Tokeniser-style items (``input_ids``, ``attention_mask`` padded to ``width``, an int ``labels``)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        k = 4 + i % (width - 4)
        ids = torch.zeros(width, dtype=torch.int64)
        ids[:k] = torch.randint(5, 40, (k,), generator=gen)
        items.append({"input_ids": ids, "attention_mask": (torch.arange(width) < k).long(), "labels": int(ids[0]) % 3})
    return items


def text_pairs(n: int = 32) -> dict[str, list[str]]:
    """(anchor, positive) text columns of distinct question/answer pairs."""
    topics = ["passwords", "logs", "exports", "billing", "backups", "regions", "quotas", "alerts"]
    anchors = [f"How do I manage {topics[i % 8]} for project {i}?" for i in range(n)]
    positives = [f"Project {i}: {topics[i % 8]} are managed under Settings, section {i % 5}." for i in range(n)]
    return {"anchor": anchors, "positive": positives}


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of ``model`` to 0 in place (a deterministic step); returns ``model``."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model
