"""Content keys during a precompute run: the table of keys scheduled so far, key checks, row digests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from blake3 import blake3

from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.write.keyset import KeySet

__all__ = ["NOT_FOUND", "KeyTable", "check_key", "row_digests"]


def check_key(k: Any) -> bytes:
    if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != 32:
        raise TypeError(f"key_fn must return 32 bytes (like actstore.key), got {type(k).__name__} "
                        f"of length {len(k) if hasattr(k, '__len__') else '?'}")
    return bytes(k)


def row_digests(columns: dict[str, Any], fields: Sequence[str], n: int) -> np.ndarray:
    """An 8-byte digest per row of the stored form of ``fields`` (to spot conflicting duplicates)."""
    hashers = [blake3() for _ in range(n)]
    for name in fields:
        col = columns[name]
        if isinstance(col, RaggedBatch):
            vals = col.values.numpy()
            off = col.offsets.numpy()
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(vals[off[i]:off[i + 1]]).tobytes() + b"|")
        elif isinstance(col, list):
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(col[i]).tobytes() + b"|")
        else:
            arr = col.numpy() if isinstance(col, torch.Tensor) else col
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(arr[i]).tobytes() + b"|")
    return np.array([int.from_bytes(h.digest(8), "little") for h in hashers], np.uint64)


class KeyTable:
    """A set of keys with one int64 code and one uint64 digest each (a :class:`~actstore.engine.write.keyset.KeySet`
    plus both, in insertion order): about 50 bytes a key."""

    def __init__(self) -> None:
        self._set = KeySet()
        self._codes = np.empty(0, np.int64)
        self._digests = np.empty(0, np.uint64)

    def __len__(self) -> int:
        return len(self._set)

    def add(self, keys: np.ndarray, codes: np.ndarray, digests: np.ndarray | None = None) -> None:
        """Add ``keys`` (distinct, not in the table yet) with their codes (and digests)."""
        m = len(keys)
        if not m:
            return
        n = len(self._set)
        self._set.add(keys)
        if n + m > len(self._codes):
            cap = max(2 * len(self._codes), n + m, 1024)
            self._codes = np.concatenate([self._codes[:n], np.empty(cap - n, np.int64)])
            self._digests = np.concatenate([self._digests[:n], np.empty(cap - n, np.uint64)])
        self._codes[n : n + m] = codes
        self._digests[n : n + m] = 0 if digests is None else digests

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(code, digest) of each key; code is ``NOT_FOUND`` for absent keys."""
        idx = self._set.find(keys)
        hit = idx >= 0
        code = np.full(len(keys), NOT_FOUND, np.int64)
        digest = np.zeros(len(keys), np.uint64)
        code[hit] = self._codes[idx[hit]]
        digest[hit] = self._digests[idx[hit]]
        return code, digest


NOT_FOUND = np.iinfo(np.int64).min
