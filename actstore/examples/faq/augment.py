"""The FAQ study's question augmentation: random word dropout and one adjacent swap, drawn from a generator.

``augment_question(text, g)`` is the ``augment=`` of ``actstore.precompute``
(every random number comes from ``g``, so a stored augmentation can be made
again); ``question_augment`` is its factory for
``actstore bench --augment actstore.examples.faq.augment:question_augment``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DROP", "SWAP", "augment_question", "question_augment"]

#: Probability that a word is dropped (at least one word is kept).
DROP = 0.1
#: Probability that one random pair of adjacent words is swapped.
SWAP = 0.5


def augment_question(text: str, g: Any) -> str:
    """``text`` with each word dropped with probability :data:`DROP` and, with probability :data:`SWAP`, two adjacent
    words swapped; the same ``text`` and generator state give the same result.

    Examples
    --------
    >>> import torch
    >>> a = augment_question("how do I reset my password", torch.Generator().manual_seed(1))
    >>> a == augment_question("how do I reset my password", torch.Generator().manual_seed(1))
    True
    """
    import torch

    words = text.split()
    if len(words) < 2:
        return text
    keep = (torch.rand(len(words), generator=g) >= DROP).tolist()
    kept = [w for w, k in zip(words, keep, strict=True) if k] or words[:1]
    swap, where = torch.rand(2, generator=g).tolist()
    if len(kept) > 1 and swap < SWAP:
        i = min(int(where * (len(kept) - 1)), len(kept) - 2)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return " ".join(kept)


def question_augment() -> Any:
    """The augment itself (a factory, for ``actstore bench --augment``)."""
    return augment_question
