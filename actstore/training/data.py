"""Training from a store: map-style datasets, batch gathering and collation.

- :class:`ActivationDataset` — the store's rows as a ``torch.utils.data.Dataset``.
- :class:`ActivationCollate` / :data:`collate` — one copy from the memory maps
  into the batch: ragged fields padded (with a mask and lengths), floating
  fields cast to the head's dtype, and, inside a DataLoader worker, straight
  into shared memory.

How a batch is made.  The datasets define ``__getitems__``, so a DataLoader with
a ``batch_size`` calls it once per batch; it returns a :class:`RowBatch` (the
rows, nothing copied yet).  The collate function then gathers every field from
the maps into freshly allocated batch tensors — in a worker process those are
allocated in shared memory, so the batch reaches the training process without a
second copy.  ``RowBatch`` is also a sequence of per-row items, so
``default_collate`` and other collate functions that iterate over samples keep
working (they copy per row).

Worker processes.  Datasets pickle as (path, committed manifest): a worker
started with ``spawn`` or ``forkserver`` re-opens exactly the snapshot the main
process saw, and maps files lazily on first use; under ``fork`` it inherits the
parent's maps.  Nothing on the read path touches zarr or asyncio.

SAFETY: items returned by ``dataset[i]`` are views of private copy-on-write maps
(never copies); they stay valid while referenced, even after the store's files
are deleted.  A store deleted under a running DataLoader keeps serving the pages
already mapped; a file not mapped yet raises :class:`~actstore.CorruptStoreError`
("data file is missing") in the worker, which the DataLoader re-raises — it never
hangs.  A file *truncated* by another program under a live map can kill the
process with ``SIGBUS``; that is outside actstore's guarantees (``verify`` finds it).

:class:`~actstore.training.recycled.CachedDataset` (the drop-in for the user's dataset)
builds on the same batches; :class:`~actstore.training.sampler.ChunkShuffleSampler`
orders them for locality.  The gathers here use the snapshot's internals
(``Snapshot.segments``, ``starts``) to write straight into the output buffer.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from actstore.engine.gather import alloc, check_float_dtype, gather_fixed, gather_padded, row_view
from actstore.engine.ragged import PaddedBatch
from actstore.engine.reader import Snapshot
from actstore.errors import StoreError
from actstore.format.manifest import Field
from actstore.store import ActivationStore
from actstore.store import open as open_store

__all__ = [
    "ActivationCollate",
    "ActivationDataset",
    "PaddedBatch",
    "PrecomputeConfig",
    "RowBatch",
    "collate",
    "gather_fixed",
    "gather_padded",
    "precompute_config",
    "row_view",
]

# -- batches and collation ----------------------------------------------------------


class RowBatch(Sequence):  # type: ignore[type-arg]
    """What ``__getitems__`` returns: a batch's rows, not copied yet.  Never copies.

    :class:`ActivationCollate` gathers it into batch tensors (one copy).  As a
    sequence it yields the dataset's per-row items, so any collate function that
    iterates over samples (``default_collate``) also works.
    """

    __slots__ = ("computed", "dataset", "positions", "rows")

    def __init__(self, dataset: Any, positions: np.ndarray, rows: np.ndarray,
                 computed: dict[str, dict[int, torch.Tensor]] | None = None) -> None:
        self.dataset = dataset
        self.positions = positions
        self.rows = rows
        self.computed = computed or {}

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset[int(self.positions[i])]

    def __repr__(self) -> str:
        return f"RowBatch({len(self)} rows of {type(self.dataset).__name__})"


class ActivationCollate:
    """Collate function for store batches: pad ragged fields, cast, one copy.

    Parameters
    ----------
    dtype
        Cast floating-point fields to this dtype (the head's), e.g. ``torch.float32``
        for a float16 store.  Integer and bool fields (labels, ids) keep theirs.
    pad_to_multiple_of
        Round the padded length of ragged fields up to a multiple of this.
    pad_value
        Value written into the padding.
    mask_dtype
        dtype of the masks (``torch.bool``; ``torch.int64`` for 0/1 masks).

    A :class:`RowBatch` is gathered field by field from the maps into the batch
    (always copies, once; into shared memory inside a DataLoader worker).  A list
    of samples (any dataset) is stacked, or padded where first dimensions differ.
    An already-batched result (a mapping, a tensor or a :class:`PaddedBatch`
    rather than a list of samples) is passed through unchanged.  Ragged fields
    become a :class:`PaddedBatch`; fixed ones a plain tensor, with no padding.

    Examples
    --------
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=ActivationCollate(torch.float32))  # doctest: +SKIP
    """

    def __init__(self, dtype: torch.dtype | None = None, pad_to_multiple_of: int | None = None, *,
                 pad_value: float = 0, mask_dtype: torch.dtype = torch.bool) -> None:
        check_float_dtype(dtype)
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        self.dtype = dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_value = pad_value
        self.mask_dtype = mask_dtype

    def __repr__(self) -> str:
        return f"ActivationCollate(dtype={self.dtype}, pad_to_multiple_of={self.pad_to_multiple_of})"

    def gather(self, snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, *, shared: bool = False,
               extra: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor | PaddedBatch:
        """One field of a batch with these options (see :func:`gather_fixed`, :func:`gather_padded`)."""
        if field.ragged:
            return gather_padded(snap, name, field, rows, dtype=self.dtype, pad_to_multiple_of=self.pad_to_multiple_of,
                                 pad_value=self.pad_value, mask_dtype=self.mask_dtype, shared=shared, extra=extra)
        return gather_fixed(snap, name, field, rows, dtype=self.dtype, shared=shared, extra=extra)

    def __call__(self, batch: Any) -> Any:
        shared = get_worker_info() is not None
        if isinstance(batch, RowBatch):
            return batch.dataset._collate(batch, self, shared)
        if isinstance(batch, (Mapping, torch.Tensor, PaddedBatch)):
            return batch  # already batched
        if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
            raise TypeError(f"collate: expected a list of samples or a RowBatch, got {type(batch).__name__}")
        return self._samples(list(batch), shared) if len(batch) else batch

    def _samples(self, samples: list[Any], shared: bool) -> Any:
        elem = samples[0]
        if isinstance(elem, np.ndarray) and elem.dtype.kind in "biuf":
            samples, elem = [torch.from_numpy(np.asarray(s)) for s in samples], torch.from_numpy(elem)
        if isinstance(elem, torch.Tensor):
            return self._tensors(samples, shared)
        if isinstance(elem, Mapping):
            return {k: self._samples([s[k] for s in samples], shared) for k in elem}
        if isinstance(elem, tuple) and hasattr(elem, "_fields"):
            return type(elem)(*(self._samples(list(parts), shared) for parts in zip(*samples, strict=True)))
        if isinstance(elem, (tuple, list)):
            return type(elem)(self._samples(list(parts), shared) for parts in zip(*samples, strict=True))
        return default_collate(samples)

    def _tensors(self, ts: list[torch.Tensor], shared: bool) -> torch.Tensor | PaddedBatch:
        first = ts[0]
        dt = self.dtype if self.dtype is not None and first.is_floating_point() else first.dtype
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) == 1:
            out = alloc((len(ts), *first.shape), dt, shared)
            if all(t.dtype == dt for t in ts):
                return torch.stack(ts, 0, out=out)
            for i, t in enumerate(ts):
                out[i].copy_(t)
            return out
        inner = {s[1:] for s in shapes}
        if first.ndim == 0 or len(inner) != 1:
            raise ValueError(f"collate: cannot batch tensors of shapes {sorted(shapes)[:4]}: only the first "
                             "dimension may differ (it is padded)")
        lengths = torch.tensor([len(t) for t in ts], dtype=torch.int64)
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = alloc((len(ts), width, *first.shape[1:]), dt, shared)
        for i, t in enumerate(ts):
            out[i, : len(t)].copy_(t)
            out[i, len(t) :] = self.pad_value
        lens = alloc((len(ts),), torch.int64, shared).copy_(lengths)
        mask = alloc((len(ts), width), self.mask_dtype, shared)
        mask.copy_(torch.arange(width)[None, :] < lengths[:, None])
        return PaddedBatch(out, mask, lens)


#: The default collate function: no cast, no extra padding.
collate = ActivationCollate()


# -- what precompute recorded -----------------------------------------------------------


@dataclass(frozen=True)
class PrecomputeConfig:
    """What :func:`actstore.precompute` recorded about the dataset (see :func:`precompute_config`)."""

    input: Any = None  #: the part of ``dataset[i]`` that was the input (None: the whole item)
    side: Mapping[Any, str] | None = None  #: item part -> side field
    layers: tuple[str, ...] = ()  #: activation fields (one per captured layer)
    length: int | None = None  #: len(dataset) at precompute time (None: an iterable)
    view: str = "dataset"  #: the view mapping dataset position -> row
    key_fn: str | None = None  #: qualified name of the key function ("actstore.key" by default)


def precompute_config(store: ActivationStore) -> PrecomputeConfig:
    """Read precompute's configuration from ``store.attrs["precompute"]`` — the one place that knows its keys.

    A store that precompute did not make gives an empty config: every field is
    an activation field and items are the input alone.
    """
    doc = store.attrs.get("precompute")
    if not isinstance(doc, Mapping):
        return PrecomputeConfig(layers=tuple(store.fields))
    sample = doc.get("sample") or {}
    kind = sample.get("type", "bare")
    side: dict[Any, str] = {}
    for col in sample.get("side") or ():
        if isinstance(col, Mapping) and col.get("field"):
            side[int(col["name"]) if kind == "tuple" else col["name"]] = col["field"]
    layers = [d["field"] for d in doc.get("layers") or () if isinstance(d, Mapping) and d.get("field") in store.fields]
    return PrecomputeConfig(
        input=None if kind == "bare" else sample.get("input"),
        side=side,
        layers=tuple(layers) or tuple(n for n in store.fields if n not in set(side.values())),
        length=doc.get("dataset_length"),
        view=doc.get("view") or "dataset",
        key_fn=doc.get("key_fn"),
    )


# -- datasets -----------------------------------------------------------------------------


def _open_read(store_or_path: Any) -> ActivationStore:
    if isinstance(store_or_path, ActivationStore):
        if store_or_path.mode == "r":
            return store_or_path
        if hasattr(store_or_path, "url"):  # a remote writer: its path is only the local staging mirror
            raise TypeError(f"{store_or_path.url}: a store open for appending cannot be read as a dataset; "
                            "open the URL again with mode='r'")
        return open_store(store_or_path.path)  # a writer's handle: read its last commit
    return open_store(store_or_path)


class _StoreHolder:
    """Holds a read-only store; pickles it whole and unpickles it lazily, on first use.

    A worker started with ``spawn`` or ``forkserver`` thus re-opens the parent's
    snapshot when it first reads (errors, such as a deleted store, surface
    through the DataLoader's normal error path) and maps only what it touches.
    """

    _store: ActivationStore | None
    _store_blob: bytes | None

    def _hold(self, store_or_path: Any) -> None:
        self._store = _open_read(store_or_path)
        self._store_blob = None

    @property
    def store(self) -> ActivationStore:
        """The read-only store (re-opened lazily in a worker process)."""
        s = self._store
        if s is None:
            if self._store_blob is None:
                raise StoreError("the dataset holds no store")
            s = self._store = pickle.loads(self._store_blob)  # the same committed snapshot as the parent's
        return s

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store_blob"] = self._store_blob if self._store is None else pickle.dumps(self._store)
        state["_store"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _check_fields(store: ActivationStore, fields: Any) -> list[str]:
    return store._field_names(fields)


def _positions(indices: Any, n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)][0]
        raise IndexError(f"index {bad} is out of range for a dataset of {n} items")
    return np.where(idx < 0, idx + n, idx)


class ActivationDataset(_StoreHolder, Dataset):  # type: ignore[type-arg]
    """The rows of a store as a map-style dataset: ``ds[i]`` is ``{field: tensor}``.

    Parameters
    ----------
    store_or_path
        A store or its path.  It is read as of its last commit (a store still
        being written shows what was committed before the dataset was made).
    fields
        The fields in each item (default: all, side columns such as labels and
        ids included).  An unknown name raises ``KeyError`` listing the fields.

    ``ds[i]`` never copies (views of the maps).  A DataLoader with a
    ``batch_size`` calls ``__getitems__`` once per batch; with
    ``collate_fn=actstore.collate`` (or an :class:`ActivationCollate`) the batch
    is gathered in one copy: ``{field: tensor}``, ragged fields as
    :class:`PaddedBatch`.

    Ordering: ``shuffle=True`` shuffles fully; for stores larger than the page
    cache use :class:`~actstore.ChunkShuffleSampler` (chunk-local, seedable).
    Under DistributedDataParallel give the DataLoader a sampler that splits by
    rank — ``ChunkShuffleSampler`` (reads the process group itself) or
    ``torch.utils.data.DistributedSampler`` — and call its ``set_epoch`` each
    epoch; ``shuffle=True`` alone would give every rank the whole store.

    Examples
    --------
    >>> ds = ActivationDataset("faq.store", fields=["hidden", "label"])  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, shuffle=True, collate_fn=actstore.collate)  # doctest: +SKIP
    """

    def __init__(self, store_or_path: Any, fields: Sequence[str] | str | None = None) -> None:
        self._hold(store_or_path)
        self.fields = _check_fields(self.store, fields)

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"ActivationDataset({self.store.path!r}, rows={len(self)}, fields={self.fields})"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` as ``{field: tensor}``: views of the maps (compressed fields: copies)."""
        store = self.store
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        seg, local = store._snap.locate(int(i))
        return {name: row_view(seg, local, name, store.fields[name]) for name in self.fields}

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """The rows of a batch, gathered later by the collate function.  Never copies."""
        rows = _positions(indices, len(self.store))
        return RowBatch(self, rows, rows)

    def _collate(self, batch: RowBatch, opts: ActivationCollate, shared: bool) -> dict[str, Any]:
        store = self.store
        return {n: opts.gather(store._snap, n, store.fields[n], batch.rows, shared=shared) for n in self.fields}

    def sampler_layout(self) -> tuple[ActivationStore, np.ndarray | None]:
        """(store, row of each position or None for the identity) — for :class:`ChunkShuffleSampler`."""
        return self.store, None
