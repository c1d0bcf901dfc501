"""Content keys during a precompute run: the table of keys scheduled so far, key checks."""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.engine.write.keyset import KeySet

__all__ = ["NOT_FOUND", "KeyTable", "check_key"]


def check_key(k: Any) -> bytes:
    if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != 32:
        raise TypeError(f"key_fn must return 32 bytes (like actstore.key), got {type(k).__name__} "
                        f"of length {len(k) if hasattr(k, '__len__') else '?'}")
    return bytes(k)


class KeyTable:
    """The keys scheduled in a run, in schedule order: a key's code is ``-(s + 2)``, ``s`` its insertion number.

    A :class:`~actstore.engine.write.keyset.KeySet` whose insertion numbers are
    the schedule ids, so nothing per key is stored beside it.  Given a
    ``directory`` its key copies and long tag runs are scratch files there
    (page cache): about 8 bytes a key of anonymous memory (the bitmap).
    """

    def __init__(self, directory: str | None = None) -> None:
        self._set = KeySet(directory)

    def __len__(self) -> int:
        return len(self._set)

    def add(self, keys: np.ndarray) -> None:
        """Schedule ``keys`` (distinct, not in the table yet): they get the next schedule ids, in order."""
        self._set.add(keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The code ``-(s + 2)`` of each key, ``NOT_FOUND`` for absent keys."""
        idx = self._set.find(keys)
        return np.where(idx >= 0, -(idx + 2), NOT_FOUND)


NOT_FOUND = np.iinfo(np.int64).min
