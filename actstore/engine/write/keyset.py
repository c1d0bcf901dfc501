"""A set of 32-byte keys with fast batch membership: for duplicate checks.

The writer keeps the keys it has buffered since its last commit in one, and
precompute the keys it has scheduled in its run.  Appending checks every batch
against these keys, so the check must cost little
more than reading the batch: no Python object per key and no sort of
everything per batch.  Three layers, cheapest first:

1. A bitmap indexed by bits of each key's hash.  A key whose bit is clear was
   never added; this settles almost every new key with one memory access.  The
   bitmap is kept at least 32 bits per key, so about 3% of new keys pass.
2. Sorted runs of *tags*, merged like a binary counter (``np.sort`` of two
   sorted runs, never a per-batch sort of everything).  A tag is 32 bits of
   the key's hash in the high half of a uint64 and the key's insertion number
   in the low half, so a binary search for the hash finds the insertion numbers
   of every added key with the same 32 hash bits.
3. Those candidates are compared with the full 32-byte keys (a copy kept in
   insertion order).  Only real duplicates, and the rare distinct keys whose
   32 hash bits agree, get here.  The hash mixes all 32 bytes, so keys that
   agree in most bytes (zero-padded ids, say) spread like random ones.

Memory: 32 bytes a key (the copy), 8 (its tag) and 4 to 8 (the bitmap).  Given
a ``directory``, the copy and the runs of more than :data:`SPILL_TAGS` tags
live in :class:`~actstore.storage.scratch.ScratchArray` files there (page
cache, not anonymous memory): only the bitmap stays in the heap, and a
precompute of 10 million samples holds about 8 bytes a key there.
"""

from __future__ import annotations

import numpy as np

from actstore.storage.scratch import ScratchArray

__all__ = ["SPILL_TAGS", "KeySet"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads structured keys too
_MIN_BITS = 20
_BITS_PER_KEY = 32
_LOW = np.uint64(0xFFFFFFFF)
_HIGH = np.uint64(0xFFFFFFFF00000000)
#: Insertion numbers live in 32 bits of a tag.
MAX_KEYS = 1 << 32
#: With a scratch directory, a merged run longer than this is written to a scratch file.
SPILL_TAGS = 1 << 18
_CHUNK = 1 << 20  # keys hashed at a time when the bitmap is rebuilt (bounds the temporaries)


class KeySet:
    """A growing set of 32-byte keys ((n, 32) uint8 arrays) with batch membership tests.

    Keys are copied on :meth:`add`: the caller may reuse its buffer at once.
    ``directory``: keep the key copies and long tag runs in scratch files there
    (see the module docstring); None keeps everything in the heap.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._dir = directory
        self._log2 = _MIN_BITS
        self._bitmap = np.zeros(1 << (_MIN_BITS - 3), np.uint8)
        self._runs: list[np.ndarray] = []  # sorted tags, longest first
        self._keys = ScratchArray(np.uint8, (32,), directory)  # insertion order
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def _hash(keys: np.ndarray) -> np.ndarray:
        """64 well-mixed bits of each key (not a checksum: only spreads keys evenly)."""
        w = np.ascontiguousarray(keys).view(np.uint64).reshape(-1, 4)
        h = (w[:, 0] * _GOLDEN) ^ w[:, 1]
        h = (h * _GOLDEN) ^ w[:, 2]
        h = (h * _GOLDEN) ^ w[:, 3]
        return h * _GOLDEN

    def _bits(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> np.uint64(64 - self._log2)).astype(np.intp)

    def _set(self, bits: np.ndarray) -> None:
        byte, mask = bits >> 3, np.left_shift(1, bits & 7).astype(np.uint8)
        self._bitmap[byte] |= mask  # where two keys share a byte, one of them may be lost ...
        lost = np.flatnonzero((self._bitmap[byte] & mask) == 0)
        if len(lost):  # ... so set those again, unbuffered (rare: ufunc.at is slow)
            np.bitwise_or.at(self._bitmap, byte[lost], mask[lost])

    def add(self, keys: np.ndarray) -> None:
        """Add ``keys``, which must be distinct and not in the set yet."""
        m = len(keys)
        if not m:
            return
        n = self._n
        if n + m > MAX_KEYS:
            raise ValueError(f"more than {MAX_KEYS:,} keys pending in one segment; commit more often")
        self._keys.append(keys)
        self._n = n + m
        stored = self._keys.view()
        h = self._hash(stored[n : n + m])
        if self._n * _BITS_PER_KEY > (1 << self._log2):
            self._log2 = int(self._n * _BITS_PER_KEY * 2 - 1).bit_length()
            self._bitmap = None  # type: ignore[assignment]  # (the old one goes before the new one is made)
            self._bitmap = np.zeros(1 << (self._log2 - 3), np.uint8)
            for a in range(0, self._n, _CHUNK):  # in chunks: the temporaries stay small
                self._set(self._bits(self._hash(stored[a : a + _CHUNK])))
        else:
            self._set(self._bits(h))
        run = (h & _HIGH) | np.arange(n, n + m, dtype=np.uint64)
        run.sort()
        while self._runs and len(self._runs[-1]) <= len(run):
            run = self._merged(self._runs.pop(), run)
        self._runs.append(run)

    def _merged(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The sorted union of two sorted runs (in a scratch file when long and a directory is given)."""
        size = len(a) + len(b)
        if self._dir is None or size <= SPILL_TAGS:
            run = np.concatenate([a, b])
        else:
            run = ScratchArray(np.uint64, (), self._dir, capacity=size).data[:size]
            np.concatenate([a, b], out=run)
        run.sort(kind="stable")  # in place: a timsort, which merges the two sorted runs in one pass
        return run

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Bool mask: which of ``keys`` are in the set."""
        return self.find(keys) >= 0

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Insertion number (0, 1, ... in the order keys were added) of each of ``keys``, or -1."""
        out = np.full(len(keys), -1, np.int64)
        if not self._n or not len(keys):
            return out
        h = self._hash(keys)
        bits = self._bits(h)
        maybe = np.flatnonzero(self._bitmap[bits >> 3] & np.left_shift(1, bits & 7).astype(np.uint8))
        if not len(maybe):
            return out
        maybe = maybe[np.argsort(h[maybe])]  # sorted needles: each binary search starts near the last one's end
        tag = h[maybe] & _HIGH
        words = np.ascontiguousarray(keys[maybe]).view(np.uint64).reshape(-1, 4)
        stored = self._keys.view().view(np.uint64).reshape(-1, 4)
        found = np.full(len(maybe), -1, np.int64)
        for run in self._runs:
            last = len(run) - 1
            lo = np.searchsorted(run, tag, side="left")
            at = np.minimum(lo, last)
            first = run[at]
            cand = np.flatnonzero(((first & _HIGH) == tag) & (lo <= last) & (found < 0))  # a key with this hash
            if not len(cand):
                continue
            idx = (first[cand] & _LOW).astype(np.int64)
            same = (stored[idx] == words[cand]).all(axis=1)
            found[cand[same]] = idx[same]
            other = cand[~same]  # the first key with this hash is another: are there more with it? (rare)
            other = other[(lo[other] < last) & ((run[np.minimum(lo[other] + 1, last)] & _HIGH) == tag[other])]
            for i in other.tolist():
                hi = int(np.searchsorted(run, tag[i] | _LOW, side="right"))
                idx = (run[lo[i] + 1 : hi] & _LOW).astype(np.int64)
                hit = np.flatnonzero((stored[idx] == words[i]).all(axis=1))
                if len(hit):
                    found[i] = idx[hit[0]]
        out[maybe] = found
        return out
