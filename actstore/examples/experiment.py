"""The FAQ study's API under its earlier name: a re-export of :mod:`actstore.examples.faq`.

Scripts and benchmarks import ``Tokenize``, ``load_minilm`` and ``read_pairs``
from here; the code lives in :mod:`actstore.examples.faq`, split by job (data,
model, losses, metrics, loops, timing).
"""

from __future__ import annotations

from actstore.examples import faq as _faq
from actstore.examples.faq import *  # noqa: F403

__all__ = list(_faq.__all__)
