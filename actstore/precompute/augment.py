"""Stored augmentations: ``K`` augmented rows per distinct sample (docs/augmentations.md, docs/FORMAT.md §11.3).

``precompute(..., augment=fn, augmentations=K)`` stores, for every dataset
position ``p`` and every augmentation index ``v`` in ``0 .. K-1``, the frozen
part's output on ``fn(x_p, g)``, where ``x_p`` is the position's model input
(before ``collate_fn``) and ``g`` a CPU ``torch.Generator`` seeded from the
sample's **content key** ``c_p`` — its input key, the key its un-augmented row
has or would have (:func:`~actstore.precompute.inputs.input_keys`) — and ``v``:

    seed(c, v) = int.from_bytes(BLAKE3(SEED_DOMAIN || c || u32le(v))[:8], "little") & (2**63 - 1)
    g = torch.Generator(); g.manual_seed(seed(c, v))

The augmented row is keyed by

    key(c, v, a) = BLAKE3(KEY_DOMAIN || c || u32le(v) || a)

with ``a`` the input key of the augmented sample as collated, so one row per
(sample, augmentation) in the key index, a content key never finds an
augmented row, and a changed ``fn`` (or collate) changes the keys of exactly
the augmentations it changes: a rerun computes those and reuses the rest.

The run itself is the ordinary one over :class:`AugmentedItems`, the dataset
expanded to ``N * K`` positions in **tiles** of :data:`TILE` items, each
augmentation-major: the run takes items ``t*TILE .. (t+1)*TILE - 1`` as
augmentation 0, then the same items as augmentation 1, and so on, so the rows
of one augmentation of a tile's items are consecutive.  An epoch that serves
one augmentation to each block of :data:`TILE` consecutive positions (the
serving side's choice, :func:`~actstore.training.augmented.choose`) then reads
runs of consecutive rows, and a tile's content keys are computed once for its
``K`` passes (:class:`AugmentSpec` keeps the last tiles').  The recorded view
is item-major — position ``p * K + v`` (FORMAT.md §11.3) —
:meth:`AugmentedItems.view_positions` maps one order to the other.
:class:`~actstore.precompute.loader.Prepare` applies the augment in the
DataLoader workers (:meth:`AugmentSpec.apply`) and derives the keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from blake3 import blake3

from actstore.precompute.inputs import input_keys
from actstore.precompute.items import Selector

__all__ = [
    "KEY_DOMAIN",
    "SEED_DOMAIN",
    "TILE",
    "AugmentSpec",
    "AugmentedItems",
    "Expanded",
    "augment_generator",
    "augment_seed",
    "augmented_key",
    "augmented_keys",
    "check_augment",
]

#: Domain of the generator seed of augmentation ``v`` of a sample (FORMAT.md §11.3).
SEED_DOMAIN = b"actstore-augment-seed-v1\x00"
#: Domain of an augmented row's key (FORMAT.md §11.3).
KEY_DOMAIN = b"actstore-augmented-key-v1\x00"
#: Items per tile of the run order (:class:`AugmentedItems`); also the positions that share a served choice.
TILE = 1024


def _v(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def augment_seed(content_key: bytes | np.ndarray, v: int) -> int:
    """The seed of augmentation ``v`` of the sample with content key ``content_key`` (a 63-bit int)."""
    d = blake3(SEED_DOMAIN + bytes(content_key) + _v(v)).digest()
    return int.from_bytes(d[:8], "little") & (2**63 - 1)


def augment_generator(content_key: bytes | np.ndarray, v: int) -> torch.Generator:
    """A new CPU generator seeded with :func:`augment_seed` — the one ``augment`` gets for augmentation ``v``.

    Examples
    --------
    >>> import actstore
    >>> c = actstore.key("a question")  # a content key (here: of a raw str)
    >>> a, b = augment_generator(c, 1), augment_generator(c, 1)
    >>> bool(torch.rand(1, generator=a) == torch.rand(1, generator=b))
    True
    """
    g = torch.Generator()
    g.manual_seed(augment_seed(content_key, v))
    return g


def augmented_key(content_key: bytes | np.ndarray, v: int, input_key: bytes | np.ndarray) -> bytes:
    """The row key of augmentation ``v`` (whose own input key is ``input_key``) of a sample (32 bytes)."""
    return blake3(KEY_DOMAIN + bytes(content_key) + _v(v) + bytes(input_key)).digest()


def augmented_keys(content: np.ndarray, vs: Sequence[int] | np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """:func:`augmented_key` of each row of ``content`` (n, 32), ``vs`` (n) and ``inputs`` (n, 32): (n, 32) uint8."""
    out = np.empty((len(content), 32), np.uint8)
    for j in range(len(content)):
        out[j] = np.frombuffer(augmented_key(content[j], int(vs[j]), inputs[j]), np.uint8)
    return out


def shape_class(x: Any) -> tuple[Any, ...]:
    """What an augmented sample must keep of its input: its type and, for arrays, dimensions and dtype; for dicts
    the keys (recursively)."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dim(), x.dtype)
    if isinstance(x, np.ndarray):
        return ("ndarray", x.ndim, x.dtype.str)
    if isinstance(x, Mapping):
        return (type(x).__name__, tuple((k, shape_class(v)) for k, v in x.items()))
    return (type(x).__name__,)


def _describe(cls: tuple[Any, ...]) -> str:
    if cls[0] in ("tensor", "ndarray"):
        return f"a {cls[1]}-d {cls[2]} {cls[0]}"
    if len(cls) > 1:
        return f"a {cls[0]} with keys {[k for k, _ in cls[1]]}"
    return f"a {cls[0]}"


class Expanded(NamedTuple):
    """A run position of :class:`AugmentedItems`: item ``p`` of the dataset, to be augmented as ``v``."""

    item: Any
    position: int
    augmentation: int


class AugmentedItems(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``dataset`` expanded to ``N * count`` run positions (``N = len(dataset)``): tile by tile of :data:`TILE`
    items, each tile's items as augmentation 0, then as augmentation 1, ... (see the module docstring).

    Reads ``dataset[p]`` for each of its positions (never copies)."""

    def __init__(self, dataset: Any, count: int) -> None:
        self.dataset, self.count = dataset, count
        self.items = len(dataset)

    def __len__(self) -> int:
        return self.items * self.count

    def __getitem__(self, j: int) -> Expanded:
        v, p = self.item_of(j)
        return Expanded(self.dataset[p], p, v)

    def item_of(self, j: int) -> tuple[int, int]:
        """(augmentation ``v``, item ``p``) of run position ``j``; ``IndexError`` outside ``[0, len(self))``."""
        if not 0 <= int(j) < len(self):
            raise IndexError(f"run position {j} is out of range for {self.items} items × {self.count} augmentations")
        p, v = divmod(int(self.view_positions(np.array([int(j)]))[0]), self.count)
        return v, p

    def view_positions(self, j: np.ndarray) -> np.ndarray:
        """The view position (item-major, ``p * K + v``) of each run position ``j``: a new int64 array."""
        j = np.asarray(j, np.int64)
        t, r = np.divmod(j, TILE * self.count)
        size = np.minimum(TILE, self.items - t * TILE)
        v, q = np.divmod(r, np.maximum(size, 1))
        return (t * TILE + q) * self.count + v  # type: ignore[no-any-return]

    def describe(self, j0: int, j1: int | None = None) -> str:
        """Where run position ``j0`` (or the batch ``j0 .. j1-1``) is, for messages: item and augmentation."""
        v, p = self.item_of(j0)
        if j1 is None:
            return f"dataset[{p}] (augmentation {v})"
        v1, p1 = self.item_of(j1 - 1)
        if v1 == v and j0 // (TILE * self.count) == (j1 - 1) // (TILE * self.count):  # one tile's one pass
            return f"dataset[{p}:{p1 + 1}] (augmentation {v}, one batch)"
        return f"dataset[{p}] (augmentation {v}) to dataset[{p1}] (augmentation {v1}) (one batch; the run takes " \
            f"tiles of {TILE} items, each tile's items as augmentation 0, then 1, ...)"


class AugmentError(ValueError):
    """An augment that failed on one sample; ``offset`` is its place in the batch."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


class AugmentTypeError(AugmentError, TypeError):
    """An augment that returned another type or shape class than its input."""


@dataclass(frozen=True)
class AugmentSpec:
    """The checked ``augment=`` and ``augmentations=`` of a precompute call."""

    fn: Callable[[Any, torch.Generator], Any]
    count: int
    #: content keys of the items met last (item position -> key): a tile's K passes collate each item once
    known: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def apply(self, inputs: list[Any], positions: Sequence[int], indices: Sequence[int],
              collate_fn: Callable[[list[Any]], Any], lengths_fn: Callable[[Any], Any] | None) -> tuple[
                  np.ndarray, list[Any]]:
        """(content key of each input, the augmented inputs): ``fn(x, augment_generator(c, v))`` for each.

        ``inputs`` are the raw model inputs of items ``positions`` (one per
        entry; a position may repeat, each with its own index ``v``).  Never
        modifies ``inputs``.  Raises :class:`AugmentError` naming the item and
        ``v`` whose augmentation failed or changed its type or shape class.
        """
        row = self.known
        first: dict[int, int] = {}
        for j, p in enumerate(positions):
            if int(p) not in row:
                first.setdefault(int(p), j)
        if first:
            if len(row) + len(first) > 4 * TILE:  # keep about the last tiles' keys (and this batch's)
                mine = {int(p): row[int(p)] for p in positions if int(p) in row}
                row.clear()
                row.update(mine)
            distinct = list(first.values())
            batch = collate_fn([inputs[j] for j in distinct])
            keys = input_keys(batch, len(distinct), lengths_fn=lengths_fn, raw=[inputs[j] for j in distinct])
            row.update({p: keys[i] for i, p in enumerate(first)})
        content = np.stack([row[int(p)] for p in positions]) if len(positions) else np.empty((0, 32), np.uint8)
        out = [self.one(inputs[j], content[j], int(indices[j]), int(positions[j]), j) for j in range(len(inputs))]
        return content, out

    def one(self, x: Any, content_key: np.ndarray | bytes, v: int, p: int, offset: int = 0) -> Any:
        """Augmentation ``v`` of ``x`` (the input of ``dataset[p]``), its type and shape class checked."""
        where = f"augment(dataset[{p}]'s input, generator of augmentation {v})"
        try:
            y = self.fn(x, augment_generator(content_key, v))
        except Exception as e:
            raise AugmentError(f"{where} raised {type(e).__name__}: {e}", offset) from e
        want, got = shape_class(x), shape_class(y)
        if want != got:
            raise AugmentTypeError(f"{where} returned {_describe(got)}, but the input is {_describe(want)}: an augment "
                               "must return a sample of its input's type and shape class (same dimensions and dtype, "
                               "same dict keys), which collate_fn and the frozen model take as they take the input",
                               offset)
        return y


def check_augment(spec: AugmentSpec, dataset: Any, selector: Selector, collate_fn: Callable[[list[Any]], Any],
                  lengths_fn: Callable[[Any], Any] | None) -> None:
    """Refuse an augment that is not deterministic under its generator, or changes its input's type or shape class.

    Calls it twice on the first sample with generators seeded alike (augmentation
    0) and compares the input keys of the two results.  Raises
    :class:`TypeError` or :class:`ValueError` naming ``dataset[0]``.
    """
    if len(dataset) == 0:
        return
    x = selector.split(dataset[0])[0]
    try:
        content, (a,) = spec.apply([x], [0], [0], collate_fn, lengths_fn)
        b = spec.one(x, content[0], 0, 0)
    except AugmentError as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"augment: {e}") from e
    ka, kb = (input_keys(collate_fn([y]), 1, lengths_fn=lengths_fn, raw=[y])[0] for y in (a, b))
    if not np.array_equal(ka, kb):
        raise ValueError(
            "augment: two calls on dataset[0]'s input with generators seeded alike (augmentation 0) returned "
            "different samples: an augment must draw every random number from the generator it is given (e.g. "
            "torch.rand(n, generator=g), torch.randperm(n, generator=g)), never from Python's random, numpy or "
            "torch's global state, so that a rerun reproduces each stored augmentation")
