"""The keys a writer has buffered since its last commit, for duplicate checks.

Appending checks every batch against these keys, so the check must cost little
more than reading the batch: no Python object per key and no sort of
everything per batch.  Three layers, cheapest first:

1. A bitmap indexed by bits of each key's hash.  A key whose bit is clear was
   never added; this settles almost every new key with one memory access.  The
   bitmap is kept at least 32 bits per key, so about 3% of new keys pass.
2. Sorted runs of the keys' 8-byte prefixes, merged like a binary counter
   (``np.sort``, never a per-batch sort of everything).  A key that passed the
   bitmap is binary-searched there; a miss settles it.
3. A prefix found in the runs is confirmed against the full 32-byte keys (kept
   in insertion order).  Only real duplicates, and distinct keys that share an
   8-byte prefix (about one in 2^64 per pair of random keys), get here.
"""

from __future__ import annotations

import numpy as np

from .reader import key_prefixes

__all__ = ["KeySet"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads structured keys too
_MIN_BITS = 20
_BITS_PER_KEY = 32


class KeySet:
    """A growing set of 32-byte keys ((n, 32) uint8 arrays) with batch membership tests."""

    def __init__(self) -> None:
        self._log2 = _MIN_BITS
        self._bitmap = np.zeros(1 << (_MIN_BITS - 3), np.uint8)
        self._runs: list[np.ndarray] = []  # sorted prefixes, longest first
        self._keys: list[np.ndarray] = []  # insertion order
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _bits(self, keys: np.ndarray) -> np.ndarray:
        words = np.ascontiguousarray(keys).view(np.uint64).reshape(-1, 4)
        mixed = (words[:, 0] ^ words[:, 1] ^ words[:, 2] ^ words[:, 3]) * _GOLDEN
        return (mixed >> np.uint64(64 - self._log2)).astype(np.intp)

    def _set(self, bits: np.ndarray) -> None:
        byte, mask = bits >> 3, np.left_shift(1, bits & 7).astype(np.uint8)
        self._bitmap[byte] |= mask  # where two keys share a byte, one of them may be lost ...
        lost = np.flatnonzero((self._bitmap[byte] & mask) == 0)
        if len(lost):  # ... so set those again, unbuffered (rare: ufunc.at is slow)
            np.bitwise_or.at(self._bitmap, byte[lost], mask[lost])

    def add(self, keys: np.ndarray, prefixes: np.ndarray | None = None) -> None:
        """Add ``keys``, which must be distinct and not in the set yet."""
        if not len(keys):
            return
        keys = np.ascontiguousarray(keys)
        self._keys.append(keys)
        self._n += len(keys)
        if self._n * _BITS_PER_KEY > (1 << self._log2):
            self._log2 = int(self._n * _BITS_PER_KEY * 2 - 1).bit_length()
            self._bitmap = np.zeros(1 << (self._log2 - 3), np.uint8)
            for k in self._keys:
                self._set(self._bits(k))
        else:
            self._set(self._bits(keys))
        run = np.sort(key_prefixes(keys) if prefixes is None else prefixes)
        while self._runs and len(self._runs[-1]) <= len(run):
            run = np.concatenate([self._runs.pop(), run])
            run.sort()
        self._runs.append(run)

    def contains(self, keys: np.ndarray, prefixes: np.ndarray | None = None) -> np.ndarray:
        """Bool mask: which of ``keys`` are in the set."""
        hit = np.zeros(len(keys), bool)
        if not self._n or not len(keys):
            return hit
        bits = self._bits(keys)
        maybe = np.flatnonzero(self._bitmap[bits >> 3] & np.left_shift(1, bits & 7).astype(np.uint8))
        if not len(maybe):
            return hit
        pre = (key_prefixes(keys) if prefixes is None else prefixes)[maybe]
        found = np.zeros(len(maybe), bool)
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, pre), len(run) - 1)
            found |= run[pos] == pre
        maybe = maybe[found]
        if len(maybe):
            hit[maybe] = self._confirm(np.ascontiguousarray(keys[maybe]))
        return hit

    def _confirm(self, keys: np.ndarray) -> np.ndarray:
        """Exact membership of ``keys`` whose prefixes are known to be in the set (rare path)."""
        if len(self._keys) > 1:
            self._keys = [np.concatenate(self._keys)]
        stored = self._keys[0]
        same_prefix = np.flatnonzero(np.isin(key_prefixes(stored), key_prefixes(keys)))
        void = np.dtype((np.void, keys.shape[1]))
        return np.isin(keys.view(void).ravel(), stored[same_prefix].view(void).ravel())
