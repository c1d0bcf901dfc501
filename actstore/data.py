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

:class:`~actstore.recycled.CachedDataset` (the drop-in for the user's dataset)
builds on the same batches; :class:`~actstore.sampler.ChunkShuffleSampler`
orders them for locality.  The gathers here use the snapshot's internals
(``Snapshot.segments``, ``starts``) to write straight into the output buffer.
"""

from __future__ import annotations

import functools
import math
import pickle
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from .errors import MissingRowsError, StoreError
from .format import Field
from .ragged import PaddedBatch
from .reader import SegmentReader, Snapshot, as_tensor
from .store import ActivationStore
from .store import open as open_store

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

#: Rows gathered at a time when a cast needs a bounce buffer (kept cache-sized).
_BOUNCE_BYTES = 256 << 10


# -- allocation and gathers ---------------------------------------------------------


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (as default_collate does)."""
    numel = math.prod(shape)
    if not shared or numel == 0:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(numel, device="cpu")
    return elem.new(storage).resize_(shape)


def check_float_dtype(dtype: Any) -> None:
    """``dtype`` (what floating fields are cast to) must be a floating torch dtype or None."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def _np_target(out: torch.Tensor, field: Field) -> np.ndarray | None:
    """A numpy view of ``out`` that numpy may assign stored values into, or None (use torch)."""
    if field.dtype == "bfloat16" or out.dtype == torch.bfloat16:
        if field.dtype == "bfloat16" and out.dtype == torch.bfloat16:
            return out.view(torch.int16).numpy().view(np.uint16)  # raw bits to raw bits
        return None
    return out.numpy()


@functools.lru_cache(maxsize=1024)
def _meta(field: Field) -> tuple[tuple[int, ...], int, torch.dtype]:
    """(inner shape, bytes per element, torch dtype) of a field, computed once (the hot path)."""
    return field.inner_shape, field.row_bytes, field.spec.torch


def _out_dtype(field: Field, dtype: torch.dtype | None) -> torch.dtype:
    t = _meta(field)[2]
    return dtype if dtype is not None and t.is_floating_point else t


def _present(rows: np.ndarray) -> np.ndarray | None:
    """Positions of rows >= 0, or None when every row is present."""
    if not len(rows) or rows.min() >= 0:
        return None
    return np.flatnonzero(rows >= 0)


def _split(snap: Snapshot, rows: np.ndarray) -> list[tuple[int, np.ndarray | None, np.ndarray]]:
    """Group rows by segment: ``[(segment, positions in rows or None for all, local rows)]``.

    Like ``Snapshot.split`` but cheap when a batch falls in one segment, the
    usual case with chunk-local sampling (two bisections, no sort).
    """
    starts = snap._starts_list
    if len(starts) == 2:
        return [(0, None, rows)]
    lo = bisect_right(starts, int(rows.min())) - 1
    hi = bisect_right(starts, int(rows.max())) - 1
    if lo == hi:
        return [(lo, None, rows - starts[lo] if starts[lo] else rows)]
    seg = np.searchsorted(snap.starts, rows, side="right") - 1
    order = np.argsort(seg, kind="stable")  # positions grouped by segment, in batch order within each
    ends = np.cumsum(np.bincount(seg - lo, minlength=hi - lo + 1)).tolist()
    out: list[tuple[int, np.ndarray | None, np.ndarray]] = []
    begin = 0
    for s, end in zip(range(lo, hi + 1), ends, strict=True):
        if end > begin:
            pos = order[begin:end]
            out.append((s, pos, rows[pos] - starts[s]))
        begin = end
    return out


def gather_fixed(
    snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gather a fixed-size field into a new ``(n, *shape)`` tensor.  Always copies, once.

    ``rows`` are committed rows (already range-checked) or -1 for positions taken
    from ``extra`` (position → row tensor).  Floating fields are cast to ``dtype``
    on the way; a cast, or rows spread over several segments, go through a
    cache-sized bounce buffer, so memory still sees one copy.  ``shared``
    allocates the result in shared memory.
    """
    out = _alloc((len(rows), *_meta(field)[0]), _out_dtype(field, dtype), shared)
    present = _present(rows)
    if present is None:
        if len(rows):
            _take_into(snap, name, field, rows, out, None)
    else:
        if len(present):
            _take_into(snap, name, field, rows[present], out, present)
        for p in np.flatnonzero(rows < 0).tolist():
            out[p].copy_(extra[p] if extra is not None else _no_extra(p))
    return out


def row_view(seg: SegmentReader, local: int, name: str, field: Field) -> torch.Tensor:
    """Row ``local`` of a segment's field as a tensor.  Never copies (a compressed field: decoded, a copy)."""
    if field.ragged:
        values, offsets = seg.ragged(name)
        return as_tensor(values[offsets[local] : offsets[local + 1]], field)
    return as_tensor(seg.fixed(name)[local, ...], field)  # [i, ...] keeps a 0-d view


def _no_extra(p: int) -> torch.Tensor:
    raise MissingRowsError(f"batch position {p} has no row in the store and nothing computed for it")


def _take_into(snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, out: torch.Tensor,
               outpos: np.ndarray | None) -> None:
    if snap is None:
        raise MissingRowsError(f"no store to read {len(rows)} rows of {name!r} from")
    tgt = _np_target(out, field)
    block = max(1, _BOUNCE_BYTES // max(_meta(field)[1], 1))
    for s, pos, local in _split(snap, rows):
        src = snap.segments[s].fixed(name)
        dest = pos if outpos is None else (outpos if pos is None else outpos[pos])
        if dest is None and tgt is not None and tgt.dtype == src.dtype:
            # rows were range-checked: 'wrap' skips numpy's buffered bounds check (2x faster)
            np.take(src, local, axis=0, out=tgt, mode="wrap")
            continue
        if dest is None:
            dest = np.arange(len(rows))
        for a in range(0, len(local), block):
            part = np.take(src, local[a : a + block], axis=0, mode="wrap")
            if tgt is not None:
                tgt[dest[a : a + block]] = part
            else:
                out[torch.from_numpy(dest[a : a + block])] = as_tensor(part, field).to(out.dtype)


def gather_padded(
    snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    pad_to_multiple_of: int | None = None, pad_value: float = 0, mask_dtype: torch.dtype = torch.bool,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> PaddedBatch:
    """Gather a ragged field into a right-padded batch with its mask and lengths.  Always copies, once.

    Each row is copied from the map straight into its slot of the padded output
    (cast on the way), and only the padding is filled: every output byte is
    written once.  ``rows``/``extra``/``shared`` as in :func:`gather_fixed`.
    """
    n = len(rows)
    starts = np.zeros(n, np.int64)
    lengths = np.zeros(n, np.int64)
    seg_of = np.full(n, -1, np.int64)
    present = _present(rows)
    idx = rows if present is None else rows[present]
    if len(idx):
        if snap is None:
            raise MissingRowsError(f"no store to read {len(idx)} rows of {name!r} from")
        for s, pos, local in _split(snap, idx):
            p = (slice(None) if pos is None else pos) if present is None else (present if pos is None else present[pos])
            offsets = snap.segments[s].ragged(name)[1]
            starts[p] = offsets[local]
            lengths[p] = offsets[local + 1] - offsets[local]
            seg_of[p] = s
    for p in np.flatnonzero(rows < 0).tolist():
        lengths[p] = len(extra[p]) if extra is not None else len(_no_extra(p))
    width = int(lengths.max()) if n else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = _alloc((n, width, *_meta(field)[0]), _out_dtype(field, dtype), shared)
    tgt = _np_target(out, field)
    pad = tgt if tgt is not None else out
    sources: dict[int, Any] = {}
    for i, (s, a, ln) in enumerate(zip(seg_of.tolist(), starts.tolist(), lengths.tolist(), strict=True)):
        if s < 0:
            out[i, :ln].copy_(extra[i])  # type: ignore[index]
        else:
            src = sources.get(s)
            if src is None:
                src = sources[s] = snap.segments[s].ragged(name)[0]  # type: ignore[union-attr]
            if tgt is not None:
                tgt[i, :ln] = src[a : a + ln]
            else:
                out[i, :ln].copy_(as_tensor(src[a : a + ln], field))
        if ln < width:
            pad[i, ln:] = pad_value
    lens = _alloc((n,), torch.int64, shared)
    lens.copy_(torch.from_numpy(lengths))
    mask = _alloc((n, width), mask_dtype, shared)
    torch.lt(torch.arange(width)[None, :], lens[:, None], out=mask) if mask_dtype == torch.bool else \
        mask.copy_(torch.arange(width)[None, :] < lens[:, None])
    return PaddedBatch(out, mask, lens)


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
            out = _alloc((len(ts), *first.shape), dt, shared)
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
        out = _alloc((len(ts), width, *first.shape[1:]), dt, shared)
        for i, t in enumerate(ts):
            out[i, : len(t)].copy_(t)
            out[i, len(t) :] = self.pad_value
        lens = _alloc((len(ts),), torch.int64, shared).copy_(lengths)
        mask = _alloc((len(ts), width), self.mask_dtype, shared)
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
