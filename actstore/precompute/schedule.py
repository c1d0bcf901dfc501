"""The deduplication schedule: which dataset positions need a forward, and the row each position ends up in.

Every dataset position gets a code::

    >= 0          a row the store had when the run started (found in its snapshot)
    -(s + 2)      the s-th distinct new sample scheduled in this run (s = 0, 1, ...)

A key met again — in the store, or earlier in this run (:class:`KeyTable`) —
gets the code of its first occurrence, so a repeated sample is computed once.
When a scheduled sample's batch is handed to the writer it gets its row
(:meth:`Schedule.rows_for`); at the end :meth:`Schedule.view` resolves every
code to a row: the ``"dataset"`` view.  (``-1`` is left free: a view's "no row".)

The per-position codes, the schedule id -> row table and the key table live
in scratch files next to the store when a ``directory`` is given
(:class:`~actstore.storage.scratch.ScratchArray`: page cache, not anonymous
memory), so a run over 10 million positions holds a few bytes a position in
its heap.

Side values (labels, ...) play no part here: they belong to dataset positions
and are kept per position in the view's columns
(:class:`~actstore.precompute.items.PositionSides`), so a repeated input with
other side values is an ordinary duplicate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.precompute.keys import NOT_FOUND, KeyTable
from actstore.storage.scratch import ScratchArray
from actstore.store import ActivationStore

__all__ = ["Schedule"]


class Schedule:
    """Codes for dataset positions, in dataset order (see the module docstring).

    ``reader`` is the store's snapshot at start (None for a new store); ``base``
    its row count, where this run's rows begin; ``directory`` where the scratch
    files go (None: in the heap).
    """

    def __init__(self, reader: ActivationStore | None, base: int, directory: str | None = None) -> None:
        self.reader, self.base = reader, base
        self.table = KeyTable(directory)
        self.codes = ScratchArray(np.int64, (), directory)  # position -> code
        self.order = ScratchArray(np.int64, (), directory)  # schedule id -> row
        self.scheduled = self.sent = self.skipped = self.duplicates = 0

    def place(self, keys: np.ndarray, pos0: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes for the positions ``pos0, pos0 + 1, ...`` of ``keys``; returns (codes, offsets of the new samples).

        The new samples (the first occurrence of each key neither stored nor
        scheduled) are scheduled here, in order; the caller computes them.
        """
        n = len(keys)
        codes = np.full(n, NOT_FOUND, np.int64)
        if self.base:
            assert self.reader is not None
            rows = self.reader.lookup(keys)
            hit = rows >= 0
            codes[hit] = rows[hit]
            self.skipped += int(hit.sum())
        miss = np.nonzero(codes == NOT_FOUND)[0]
        if len(miss):
            tcodes = self.table.lookup(keys[miss])
            old = tcodes != NOT_FOUND
            codes[miss[old]] = tcodes[old]
            self.duplicates += int(old.sum())
            miss = miss[~old]
        new: np.ndarray = np.empty(0, np.int64)
        if len(miss):  # schedule the first occurrence of each new key; later ones share its code
            void = np.ascontiguousarray(keys[miss]).view(np.dtype((np.void, 32))).ravel()
            _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
            first_of = miss[first][inverse.ravel()]  # offset of each miss's first occurrence
            new = np.sort(miss[first])
            sched = -(np.arange(self.scheduled, self.scheduled + len(new), dtype=np.int64) + 2)
            self.scheduled += len(new)
            codes[new] = sched
            self.table.add(keys[new])  # (its insertion numbers are the schedule ids)
            codes[miss] = codes[first_of]
            self.duplicates += int((first_of != miss).sum())
        self.codes.append(codes)
        return codes, new

    @staticmethod
    def schedule_id(code: Any) -> Any:
        """The schedule id ``s`` of a code ``-(s + 2)`` (ints or arrays)."""
        return -code - 2

    def rows_for(self, sched: np.ndarray) -> np.ndarray:
        """The rows of scheduled samples ``sched``, sent to the writer now, in this order."""
        rows = np.arange(self.base + self.sent, self.base + self.sent + len(sched), dtype=np.int64)
        self.order.reserve(self.scheduled)
        self.order.n = self.scheduled
        self.order.data[sched] = rows
        self.sent += len(sched)
        return rows

    def view(self) -> np.ndarray:
        """Position → row for every position placed (once every scheduled sample was sent).

        Resolves the codes in place, a million at a time, and returns them (never copies; in the scratch file
        when there is one)."""
        codes, order = self.codes.view(), self.order.data
        for a in range(0, len(codes), 1 << 20):
            part = codes[a : a + (1 << 20)]
            sched = np.flatnonzero(part < 0)
            part[sched] = order[self.schedule_id(part[sched])]
        return codes
