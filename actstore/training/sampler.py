"""ChunkShuffleSampler: shuffled epochs whose reads stay chunk-local.

A fully random shuffle touches the store's files in random order: on a cold
page cache (a store larger than RAM, or object storage behind a chunk cache)
every batch pays random reads.  This sampler keeps the randomness where it is
cheap: it cuts the rows into *blocks* of consecutive rows (about
``block_bytes`` each, never across a segment file), groups each segment's
blocks, in random order, into *windows* of ``window`` blocks, visits the
windows in random order and shuffles the rows within each window.  Reads stay
inside a window's few megabytes of one file at a time, and every epoch visits
the rows in a new order.  While a window is consumed, the next one is read
ahead (``posix_fadvise(POSIX_FADV_WILLNEED)`` over its byte ranges), so a cold
window is a page-cache hit by the time its batches are gathered.

The trade-off: a batch draws its rows from one or two windows, so batches are
less mixed than with ``shuffle=True`` when the store's row order is correlated
with the labels (rows are stored in the order precompute saw them).  A larger
``window`` mixes more, ``mix_segments=True`` builds windows from blocks of
different segments (more mixing, more files per batch), and ``shuffle=True`` in
the DataLoader stays available for a full shuffle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from actstore.environment import environment
from actstore.format.arrays import chunk_path
from actstore.format.layout import FIELDS_DIR, field_arrays
from actstore.store import ActivationStore
from actstore.store import open as open_store

__all__ = ["ChunkShuffleSampler", "dist_info"]

#: Default bytes of one block (a few of the store's inner chunks).
DEFAULT_BLOCK_BYTES = 4 << 20


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process (see :func:`actstore.environment.environment`), or (0, 1) outside
    distributed training."""
    env = environment()
    return env.rank, env.world


def _row_bytes(store: ActivationStore) -> float:
    """Average bytes per row over every field (ragged fields by their stored element count)."""
    total = 0.0
    rows = max(len(store), 1)
    for name, f in store.fields.items():
        if f.ragged:
            count = sum(s.values[name] for s in store.manifest.segments)
            total += f.row_bytes * count / rows
        else:
            total += f.row_bytes
    return max(total, 1.0)


def _layout(source: Any) -> tuple[ActivationStore, np.ndarray | None]:
    """(a read-only store, row of each position or None for the identity)."""
    if hasattr(source, "sampler_layout"):
        store, rows = source.sampler_layout()
        return store, rows
    if isinstance(source, ActivationStore):
        return (source if source.mode == "r" else open_store(source.path)), None
    if isinstance(source, (str, os.PathLike)):
        return open_store(source), None
    raise TypeError(f"ChunkShuffleSampler: expected a store, a path, an ActivationDataset or a CachedDataset, "
                    f"got {type(source).__name__}")


class ChunkShuffleSampler(Sampler[int]):
    """Seedable, chunk-local shuffle of a store's rows (or a CachedDataset's positions).

    Parameters
    ----------
    source
        An :class:`~actstore.ActivationStore`, its path, an
        :class:`~actstore.ActivationDataset` or a :class:`~actstore.CachedDataset`
        (whose positions are grouped by the row they map to).
    window
        Blocks whose rows are shuffled together.
    seed
        With :meth:`set_epoch`'s epoch, determines the order; the same
        ``(seed, epoch)`` gives the same order on every rank and machine.
    block_rows, block_bytes
        Block size, in rows or (default 4 MiB) bytes of the store's rows.
    rank, world_size
        Distributed splitting (default: the default process group, read at
        iteration time; ``(0, 1)`` outside distributed training).
    drop_last
        Drop the tail so every rank gets ``len // world_size`` rows, instead of
        padding.
    mix_segments
        Build windows from blocks of any segment (default: a window's blocks
        come from one segment, so a batch usually reads one file).
    readahead
        Hint the kernel to read the next window into the page cache while the
        current one is consumed (``posix_fadvise``; a no-op where unavailable).

    Distributed splitting, as ``DistributedSampler``: all ranks compute the same
    epoch order; unless ``drop_last``, it is padded to a multiple of
    ``world_size`` by repeating its first rows (so a few rows are seen twice per
    epoch, never more than ``world_size - 1``), and rank ``r`` takes the ``r``-th
    contiguous slice — contiguous, so each rank reads whole windows and its
    reads stay local.  Each row is seen once per epoch across ranks (plus the
    padding repeats), and every rank gets the same number of rows.

    Examples
    --------
    >>> sampler = ChunkShuffleSampler(ds, window=8, seed=0)  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, sampler=sampler, collate_fn=actstore.collate)  # doctest: +SKIP
    >>> for epoch in range(3):  # doctest: +SKIP
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader: ...
    """

    def __init__(self, source: Any, window: int = 8, seed: int = 0, *, block_rows: int | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, mix_segments: bool = False, readahead: bool = True) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive int, got {window!r}")
        if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 1):
            raise ValueError(f"block_rows: expected a positive int or None, got {block_rows!r}")
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        if rank is not None and not 0 <= rank < (world_size or 1 << 62):
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank!r}")
        store, rows = _layout(source)
        self.window = window
        self.seed = int(seed)
        self.epoch = 0
        self.drop_last = drop_last
        self.mix_segments = mix_segments
        self._rank, self._world = rank, world_size
        self.block_rows = block_rows or max(1, int(block_bytes // _row_bytes(store)))
        self._rows = rows
        self._order, self._block_starts, self._block_seg = self._blocks(store.snapshot.starts, rows)
        self._hints = _ReadAhead(store) if readahead and len(store) else None

    def _blocks(self, starts: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions sorted by row, where each block starts in that order, and each block's segment."""
        if rows is None:
            order = np.arange(int(starts[-1]), dtype=np.int64)
            sorted_rows = order
        else:
            order = np.argsort(rows, kind="stable").astype(np.int64)
            sorted_rows = rows[order]
        seg = np.searchsorted(starts, sorted_rows, side="right") - 1  # -1 for missing rows (-1)
        local = sorted_rows - starts[np.maximum(seg, 0)]
        block_id = np.where(sorted_rows < 0, -1 - np.arange(len(order)) // self.block_rows,  # missing rows
                            seg * (1 << 40) + local // self.block_rows)
        breaks = np.nonzero(np.diff(block_id))[0] + 1 if len(order) else np.empty(0, np.int64)
        block_starts = np.concatenate([[0], breaks, [len(order)]]).astype(np.int64)
        return order, block_starts, seg[block_starts[:-1]] if len(order) else np.empty(0, np.int64)

    @property
    def blocks(self) -> int:
        """How many blocks of consecutive rows (within one segment) the sampler shuffles."""
        return len(self._block_starts) - 1

    def _dist(self) -> tuple[int, int]:
        rank, world = dist_info()
        return (self._rank if self._rank is not None else rank), (self._world if self._world is not None else world)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` next (call it before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def _windows(self, gen: np.random.Generator) -> list[np.ndarray]:
        """The epoch's windows: arrays of block numbers, in visiting order."""
        nb = self.blocks
        perm = gen.permutation(nb)
        if self.mix_segments:
            return [perm[w : w + self.window] for w in range(0, nb, self.window)]
        # each segment's blocks in random order, cut into windows; then the windows in random order
        perm = perm[np.argsort(self._block_seg[perm], kind="stable")]
        seg = self._block_seg[perm]
        cuts = np.flatnonzero(np.diff(seg)) + 1
        windows = [run[w : w + self.window] for run in np.split(perm, cuts) for w in range(0, len(run), self.window)]
        return [windows[i] for i in gen.permutation(len(windows))]

    def permutation(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's order (every rank's positions, before padding)."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(order, end of each window in it)."""
        gen = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        windows = self._windows(gen)
        if not windows:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        perm = np.concatenate(windows)
        lens = np.diff(self._block_starts)[perm]
        begin = self._block_starts[:-1][perm]
        total = int(lens.sum())
        # positions of the permuted blocks, back to back
        take = np.repeat(begin - (np.cumsum(lens) - lens), lens) + np.arange(total)
        out = self._order[take]
        block_ends = np.cumsum(lens)
        ends = block_ends[np.cumsum([len(w) for w in windows]) - 1]
        a = 0
        for b in ends.tolist():  # shuffle the rows within each window
            gen.shuffle(out[a:b])
            a = b
        return out, ends

    def _per_rank(self, world: int) -> int:
        n = len(self._order)
        return n // world if self.drop_last else math.ceil(n / world)

    def __len__(self) -> int:
        return self._per_rank(self._dist()[1])

    def __iter__(self) -> Iterator[int]:
        rank, world = self._dist()
        order, ends = self._epoch()
        per = self._per_rank(world)
        need = per * world
        if need > len(order):  # pad by repeating the first rows (wrapping if tiny)
            order = np.concatenate([order, np.resize(order, need - len(order))]) if len(order) else order
        mine = order[rank * per : (rank + 1) * per]
        if self._hints is None or not len(mine):
            return iter(mine.tolist())
        # window boundaries within this rank's slice, for the read-ahead hints
        cuts = np.clip(ends - rank * per, 0, len(mine))
        cuts = np.unique(np.concatenate([cuts[(cuts > 0) & (cuts < len(mine))], [len(mine)]]))
        return self._with_hints(mine, cuts)

    def _with_hints(self, mine: np.ndarray, cuts: np.ndarray) -> Iterator[int]:
        rows = mine if self._rows is None else self._rows[mine]
        hints = self._hints
        assert hints is not None
        a = 0
        bounds = cuts.tolist()
        hints.advise(rows[: bounds[0]])
        for i, b in enumerate(bounds):
            if i + 1 < len(bounds):  # the next window is read ahead while this one is consumed
                hints.advise(rows[b : bounds[i + 1]])
            yield from mine[a:b].tolist()
            a = b


class _ReadAhead:
    """Ask the kernel to read a window's byte ranges into the page cache ahead of use (``POSIX_FADV_WILLNEED``).

    Reads are then page-cache hits instead of synchronous faults.  The hint is
    advisory and asynchronous; on systems without ``posix_fadvise`` it does nothing.
    """

    def __init__(self, store: ActivationStore) -> None:
        self.snap = store.snapshot
        self.fields = dict(store.fields)
        self.enabled = hasattr(os, "posix_fadvise")

    def advise(self, rows: np.ndarray) -> None:
        if not self.enabled or not len(rows):
            return
        rows = np.sort(rows[rows >= 0])
        if not len(rows):
            return
        snap = self.snap
        seg = np.searchsorted(snap.starts, rows, side="right") - 1
        local = rows - snap.starts[seg]
        # contiguous runs of rows (gaps under 64 rows are read through) within each segment
        brk = np.flatnonzero((np.diff(seg) != 0) | (np.diff(local) > 64)) + 1
        for lo_i, hi_i in zip(np.concatenate([[0], brk]).tolist(), np.concatenate([brk, [len(rows)]]).tolist(),
                              strict=True):
            s = int(seg[lo_i])
            self._advise_rows(snap.segments[s], int(local[lo_i]), int(local[hi_i - 1]) + 1)

    def _advise_rows(self, seg: Any, lo: int, hi: int) -> None:
        for name, f in self.fields.items():
            inner = f.inner_shape
            if f.ragged:
                offsets = seg.ragged(name)[1]
                lo_b, hi_b = int(offsets[lo]) * f.row_bytes, int(offsets[hi]) * f.row_bytes
                rel = os.path.join(FIELDS_DIR, name, "values")
            else:
                lo_b, hi_b = lo * f.row_bytes, hi * f.row_bytes
                rel = field_arrays(name, f)[0].rel
            path = os.path.join(seg.path, rel, *chunk_path(len(inner) + 1).split("/"))
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # a missing file is reported by the read itself
            try:
                os.posix_fadvise(fd, lo_b, max(hi_b - lo_b, 1), os.POSIX_FADV_WILLNEED)
            except OSError:
                self.enabled = False
            finally:
                os.close(fd)
