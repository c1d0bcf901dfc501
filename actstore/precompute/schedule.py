"""The deduplication schedule: which dataset positions need a forward, and the row each position ends up in.

Every dataset position gets a code::

    >= 0          a row the store had when the run started (found in its snapshot)
    -(s + 2)      the s-th distinct new sample scheduled in this run (s = 0, 1, ...)

A key met again — in the store, or earlier in this run (:class:`KeyTable`) —
gets the code of its first occurrence, so a repeated sample is computed once.
When a scheduled sample's batch is handed to the writer it gets its row
(:meth:`Schedule.rows_for`); at the end :meth:`Schedule.view` resolves every
code to a row: the ``"dataset"`` view.  (``-1`` is left free: a view's "no row".)

Duplicates whose side values (labels, ...) differ from the first occurrence's
are counted and a few positions kept, for the run's final warning; the store
keeps the side values seen first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.precompute.items import SideColumns
from actstore.precompute.keys import NOT_FOUND, KeyTable, row_digests
from actstore.store import ActivationStore

__all__ = ["Schedule"]

#: Dataset positions named in the warning about conflicting side values.
SHOWN_CONFLICTS = 5


class Schedule:
    """Codes for dataset positions, in dataset order (see the module docstring).

    ``reader`` is the store's snapshot at start (None for a new store); ``base``
    its row count, where this run's rows begin.
    """

    def __init__(self, reader: ActivationStore | None, base: int) -> None:
        self.reader, self.base = reader, base
        self.table = KeyTable()
        self.codes: list[np.ndarray] = []
        self.order = np.empty(1024, np.int64)  # schedule id -> row
        self.scheduled = self.sent = self.skipped = self.duplicates = 0
        self.conflicts: list[int] = []  # a few dataset positions whose side values differ from their row's
        self.n_conflicts = 0

    def place(self, keys: np.ndarray, pos0: int, sides: list[Any], side: SideColumns) -> tuple[np.ndarray, np.ndarray]:
        """Codes for the positions ``pos0, pos0 + 1, ...`` of ``keys``; returns (codes, offsets of the new samples).

        The new samples (the first occurrence of each key neither stored nor
        scheduled) are scheduled here, in order; the caller computes them.
        """
        n = len(keys)
        positions = list(range(pos0, pos0 + n))
        digests = row_digests(side.convert(sides, positions), side.fields, n) if side.columns else None
        codes = np.full(n, NOT_FOUND, np.int64)
        if self.base:
            assert self.reader is not None
            rows = self.reader.lookup(keys)
            hit = rows >= 0
            codes[hit] = rows[hit]
            self.skipped += int(hit.sum())
            if digests is not None and hit.any():
                stored = row_digests(self.reader.gather(rows[hit], side.fields), side.fields, int(hit.sum()))
                self._conflicts(stored, digests[hit], np.asarray(positions)[hit])
        miss = np.nonzero(codes == NOT_FOUND)[0]
        if len(miss):
            tcodes, tdig = self.table.lookup(keys[miss])
            old = tcodes != NOT_FOUND
            codes[miss[old]] = tcodes[old]
            self.duplicates += int(old.sum())
            if digests is not None:
                self._conflicts(tdig[old], digests[miss[old]], miss[old] + pos0)
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
            self.table.add(keys[new], sched, None if digests is None else digests[new])
            codes[miss] = codes[first_of]
            dup = first_of != miss
            self.duplicates += int(dup.sum())
            if digests is not None and dup.any():
                self._conflicts(digests[first_of[dup]], digests[miss[dup]], miss[dup] + pos0)
        self.codes.append(codes)
        return codes, new

    @staticmethod
    def schedule_id(code: Any) -> Any:
        """The schedule id ``s`` of a code ``-(s + 2)`` (ints or arrays)."""
        return -code - 2

    def rows_for(self, sched: np.ndarray) -> np.ndarray:
        """The rows of scheduled samples ``sched``, sent to the writer now, in this order."""
        rows = np.arange(self.base + self.sent, self.base + self.sent + len(sched), dtype=np.int64)
        if sched.max(initial=-1) >= len(self.order):
            self.order = np.concatenate([self.order, np.empty(max(len(self.order), int(sched.max()) + 1), np.int64)])
        self.order[sched] = rows
        self.sent += len(sched)
        return rows

    def view(self) -> np.ndarray:
        """Position → row for every position placed (once every scheduled sample was sent)."""
        codes = np.concatenate(self.codes) if self.codes else np.empty(0, np.int64)
        sched = codes < 0
        codes[sched] = self.order[self.schedule_id(codes[sched])]
        return codes

    def _conflicts(self, first: np.ndarray, now: np.ndarray, positions: np.ndarray) -> None:
        differ = positions[first != now]
        self.conflicts += [int(p) for p in differ[: max(0, SHOWN_CONFLICTS - len(self.conflicts))]]
        self.n_conflicts += len(differ)
