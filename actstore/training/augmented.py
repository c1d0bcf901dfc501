"""Serving stored augmentations: which of a position's ``K`` augmentations an epoch gets.

A store precomputed with ``augment=fn, augmentations=K`` holds ``K`` rows per
dataset position (its ``"dataset"`` view lists position ``p``'s augmentation
``v`` at ``p * K + v``).  :class:`~actstore.CachedDataset` with
``augmentation="random"`` serves one of them per position and epoch, chosen by
:func:`choose` from ``(seed, epoch, position)`` alone — so every DataLoader
worker, every rank and every instance serves the same one:

- ``"random"`` (default): epochs ``c*K .. c*K + K-1`` (cycle ``c``) serve a
  permutation of ``0 .. K-1``: over any ``K`` aligned epochs a position sees each
  of its augmentations once.  The permutation is the ``r``-th in lexicographic
  order, ``r = h(seed, c, b, 0) mod K!`` with ``b = p // BLOCK`` the position's
  block, and epoch ``e`` takes its element ``e mod K`` (:func:`choose`);
- ``"draw"``: independent draws with replacement, ``h(seed, e, b, K) mod K``.

``h`` is SplitMix64's finaliser over ``seed*A + cycle_or_epoch*B + b*C + i*D``
(mod 2**64, constants below): cheap, vectorised, and the same on every machine.

**Why blocks.**  The :data:`BLOCK` consecutive positions of a block share their
choice, so an epoch reads runs of consecutive rows: precompute writes the rows
of one augmentation index of a block's items together (augmentation-major
within tiles of the same size, :data:`~actstore.precompute.augment.TILE`),
and an epoch then touches as many pages as an epoch of a store without
augmentations (an epoch with a choice per position touched ``K`` times as many,
and ran 1.2x slower).  It changes nothing a model can see: augmentation ``v`` of
an item is made by a generator seeded from the item's content key and ``v``
alone, so an item's ``K`` augmentations are exchangeable and independent of
other items' — whichever rule picks the index, what each position is served has
the same distribution, jointly over positions and epochs.  (One exception:
equal items within a block share their stored rows and hence their augmentation
in each epoch, where a choice per position would give them the same one with
probability ``1/K``.)

**The epoch.**  ``CachedDataset.set_epoch(e)`` sets it in the process that
calls it; DataLoader workers hold a copy of the dataset made when they started
(once, with ``persistent_workers=True``), which never sees a later
``set_epoch``.  :class:`EpochSampler` carries the epoch in the indices
instead: it yields ``(epoch, position)`` pairs, read in the main process at
the start of each epoch, which ``__getitems__`` decodes in the worker.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from actstore.errors import NoAugmentationsError
from actstore.precompute.augment import TILE

__all__ = ["BLOCK", "MODES", "EpochSampler", "augmentation_mode", "block_choices", "choose", "mix", "split_indices"]

#: ``augmentation=`` modes besides a fixed index: a permutation per K epochs, or draws with replacement.
MODES = ("random", "draw")

_A, _B, _C, _D = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
                  np.uint64(0xD6E8FEB86659FD93))


def _partial(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _A + np.uint64(epoch) * _B  # type: ignore[no-any-return]
                + positions.astype(np.uint64) * _C)


def _finish(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))  # type: ignore[no-any-return]


def mix(seed: int, epoch: int, positions: np.ndarray, i: np.ndarray | int) -> np.ndarray:
    """``h(seed, epoch, p, i)`` for every ``p`` of ``positions`` (broadcast with ``i``): uint64, SplitMix64's
    finaliser of ``seed*A + epoch*B + p*C + i*D`` (mod 2**64)."""
    with np.errstate(over="ignore"):
        return _finish(_partial(seed, epoch, positions) + np.asarray(i, np.uint64) * _D)


#: Consecutive positions that share their choice (see "Why blocks" above): precompute's tile of items.
BLOCK = TILE

#: The largest count ``"random"`` serves (``count!`` must fit in 64 bits); beyond it, ``"draw"``.
MAX_PERMUTED = 20
_TABLE_UP_TO = 8  # permutation tables (count! rows) kept for counts up to this
_TABLES: dict[int, np.ndarray] = {}


def _table(count: int) -> np.ndarray:
    """Every permutation of ``0 .. count-1`` in lexicographic order: ``(count!, count)`` int8 (cached)."""
    got = _TABLES.get(count)
    if got is None:
        got = _TABLES[count] = np.array(list(itertools.permutations(range(count))), np.int8).reshape(-1, count)
    return got


def _unrank(r: np.ndarray, count: int, slot: int) -> np.ndarray:
    """Element ``slot`` of the ``r``-th permutation of ``0 .. count-1`` in lexicographic order (per row of ``r``)."""
    n = len(r)
    rest = np.tile(np.arange(count, dtype=np.int64), (n, 1))
    rows = np.arange(n)
    out = rest[:, 0]
    for i in range(slot + 1):
        radix = math.factorial(count - 1 - i)
        d = ((r // np.uint64(radix)) % np.uint64(count - i)).astype(np.intp)
        out = rest[rows, d]
        keep = np.arange(count - i - 1)[None, :]
        rest = np.where(keep < d[:, None], rest[:, :-1], rest[:, 1:])
    return out


def choose(seed: int, epoch: int, positions: np.ndarray, count: int, mode: str = "random") -> np.ndarray:
    """The augmentation index (``0 .. count-1``) each of ``positions`` gets in ``epoch``: int64, new.

    ``"random"``: with cycle ``c = epoch // count``, position ``p`` takes the
    ``r``-th permutation of ``0 .. count-1`` in lexicographic order, ``r =
    h(seed, c, p // BLOCK, 0) mod count!``, and epoch ``epoch`` serves its
    element ``epoch mod count`` (``count`` up to :data:`MAX_PERMUTED`).
    ``"draw"``: ``h(seed, epoch, p // BLOCK, count) mod count``.

    Examples
    --------
    >>> sorted(int(choose(0, e, np.array([7]), 4)[0]) for e in range(4))  # epochs 0-3: each index once
    [0, 1, 2, 3]
    """
    return block_choices(seed, epoch, np.asarray(positions, np.int64) // BLOCK, count, mode)


def block_choices(seed: int, epoch: int, blocks: np.ndarray, count: int, mode: str = "random") -> np.ndarray:
    """The augmentation index each of ``blocks`` (block ``b``: positions ``b * BLOCK .. (b+1) * BLOCK - 1``) gets
    in ``epoch``, as :func:`choose` (int64, new)."""
    blocks = np.asarray(blocks, np.int64)
    if mode == "draw":
        return (mix(seed, epoch, blocks, count) % np.uint64(count)).astype(np.int64)
    if count > MAX_PERMUTED:
        raise ValueError(f"augmentation='random' permutes at most {MAX_PERMUTED} augmentations per item, the store "
                         f"holds {count}: use augmentation='draw'")
    cycle, slot = divmod(int(epoch), count)
    r = mix(seed, cycle, blocks, 0) % np.uint64(math.factorial(count))
    if count <= _TABLE_UP_TO:
        return _table(count)[r.astype(np.intp), slot].astype(np.int64)
    return _unrank(r, count, slot)


class EpochSampler(Sampler[Any]):
    """A sampler of a :class:`~actstore.CachedDataset` whose indices carry the epoch: ``(epoch, position)``.

    Wraps ``sampler`` (default: every position in order; pass a
    ``RandomSampler``, ``DistributedSampler`` or
    :class:`~actstore.ChunkShuffleSampler` for shuffled epochs) and yields each
    of its positions as ``(epoch, position)``, with ``epoch`` as set by
    :meth:`set_epoch` when iteration starts.  ``set_epoch`` is passed on to the
    wrapped sampler and to ``dataset`` (when they have one).  Needed with
    ``persistent_workers=True``; harmless otherwise.

    Examples
    --------
    >>> # sampler = EpochSampler(ds, RandomSampler(ds)); DataLoader(ds, sampler=sampler, num_workers=2,
    >>> #                                                            persistent_workers=True)
    >>> # for epoch in range(E): sampler.set_epoch(epoch); ...
    """

    def __init__(self, dataset: Sized, sampler: Any = None) -> None:
        self.dataset = dataset
        self.sampler = sampler if sampler is not None else range(len(dataset))
        self.epoch = int(getattr(dataset, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (also given to the wrapped sampler and the dataset)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)
        for obj in (self.sampler, self.dataset):
            fn = getattr(obj, "set_epoch", None)
            if callable(fn):
                fn(self.epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for p in self.sampler:
            yield epoch, int(p)


def split_indices(indices: Any, epoch: int) -> tuple[int | np.ndarray, np.ndarray]:
    """(epoch, positions) of a batch's indices: ``(epoch, position)`` pairs from :class:`EpochSampler`, or plain
    positions (served as of ``epoch``).  The epoch is an int when the batch has one (always, from
    :class:`EpochSampler`), else an array per index.  New arrays; positions are not range-checked here."""
    idx = indices if isinstance(indices, list) else list(indices)
    if not idx or not isinstance(idx[0], tuple):
        return int(epoch), np.asarray(idx, np.int64).reshape(-1)
    try:
        epochs = {e for e, _ in idx}
        pos = np.fromiter((p for _, p in idx), np.int64, len(idx))
    except (TypeError, ValueError) as e:
        raise TypeError("indices: expected all (epoch, position) pairs (EpochSampler) or all ints, got a mix") from e
    if len(epochs) == 1:
        return int(epochs.pop()), pos
    return np.fromiter((e for e, _ in idx), np.int64, len(idx)), pos


def augmentation_mode(value: Any, count: int, path: str, index: str) -> str | int | None:
    """The checked ``augmentation=`` for a store with ``count`` augmentations per position."""
    if value is None:
        if count > 1:
            raise NoAugmentationsError(
                f"CachedDataset({path}): the store holds {count} augmentations of each item and no un-augmented rows; "
                "pass augmentation='random' (one per epoch: set_epoch, or ds.epoch_sampler() with workers), 'draw' "
                f"or a fixed index 0..{count - 1}")
        return None
    ok = value in MODES if isinstance(value, str) else isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"augmentation: expected 'random', 'draw', an index or None, got {value!r}")
    if count == 1:
        raise NoAugmentationsError(
            f"CachedDataset({path}): augmentation={value!r}, but the store holds no augmentations (precompute ran "
            "without augment=); add them with actstore.precompute(model, dataset, path, augment=fn, augmentations=K) "
            "— into a new path to keep this store — or pass augmentation=None")
    if index != "view":
        raise ValueError(f"augmentation={value!r} serves the rows the 'dataset' view lists per item; index={index!r} "
                         "cannot (pass index='view')")
    if value == "random" and count > MAX_PERMUTED:
        raise ValueError(f"augmentation='random' permutes at most {MAX_PERMUTED} augmentations per item, the store "
                         f"holds {count}: pass augmentation='draw' (with replacement) or a fixed index")
    if not isinstance(value, str) and not 0 <= int(value) < count:
        raise ValueError(f"augmentation: expected an index in 0..{count - 1} (the store holds {count} augmentations "
                         f"per item), got {value!r}")
    return value if isinstance(value, str) else int(value)
