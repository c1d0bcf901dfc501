"""The FAQ study's training loss: the symmetric multiple-negatives ranking loss with in-batch negatives."""

from __future__ import annotations

from typing import Any

__all__ = ["mnrl_loss"]


def mnrl_loss(q: Any, a: Any, scale: float = 20.0, symmetric: bool = True) -> Any:
    """Multiple-negatives ranking loss with in-batch negatives, as sentence-transformers computes it.

    ``q`` and ``a`` are (batch, dim) embeddings of matching pairs.  The score of
    question ``i`` and answer ``j`` is ``scale * cos(q_i, a_j)``; the loss is the
    cross-entropy of picking ``a_i`` among the batch's answers, averaged with the
    answer -> question direction when ``symmetric``.
    """
    import torch
    from torch.nn import functional as F

    scores = scale * (F.normalize(q, dim=-1) @ F.normalize(a, dim=-1).T)
    target = torch.arange(len(q), device=scores.device)
    loss = F.cross_entropy(scores, target)
    if symmetric:
        loss = (loss + F.cross_entropy(scores.T, target)) / 2
    return loss

