"""Training from a store: map-style datasets over its rows.

- :class:`ActivationDataset` — the store's rows as a ``torch.utils.data.Dataset``.
- :class:`~actstore.training.collate.ActivationCollate` / ``collate`` — one copy
  from the memory maps into the batch (see :mod:`actstore.training.collate`).

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
orders them for locality.  Rows are read through
``store.snapshot`` with :mod:`actstore.engine.read.gather`.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from actstore.deprecation import renamed_arguments
from actstore.engine.read.plans import make_row, row_plan
from actstore.errors import StaleStoreError, StoreError
from actstore.format.record import PrecomputeRecord, read_record
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.store import ActivationStore
from actstore.store import open as open_store
from actstore.training.collate import ActivationCollate, RowBatch

__all__ = ["ActivationDataset", "RecordSummary", "precompute_config"]


# -- what precompute recorded -----------------------------------------------------------


@dataclass(frozen=True)
class RecordSummary:
    """The training side's reading of the precompute record (see :func:`precompute_config`)."""

    input: Any = None  #: the part of ``dataset[i]`` that was the input (None: the whole item)
    side: dict[Any, str] | None = None  #: item part -> side field
    layers: tuple[str, ...] = ()  #: activation fields (one per captured layer)
    length: int | None = None  #: len(dataset) at precompute time (None: an iterable)
    view: str = "dataset"  #: the view mapping dataset position -> row
    key_fn: str | None = None  #: qualified name of the key function ("actstore.key" by default)
    record: PrecomputeRecord | None = None  #: the record itself (None: precompute did not make the store)


def precompute_config(store: ActivationStore) -> RecordSummary:
    """Read ``store.attrs["precompute"]`` through :class:`~actstore.format.record.PrecomputeRecord`.

    A store that precompute did not make gives an empty config: every field is
    an activation field and items are the input alone.  Raises
    :class:`~actstore.UnsupportedFormatError` for a record of another version and
    :class:`~actstore.CorruptStoreError` for a malformed one.
    """
    rec = read_record(store.attrs, store.path)
    if rec is None:
        return RecordSummary(layers=tuple(store.fields))
    side = rec.side_fields
    layers = [f for f in rec.layer_fields if f in store.fields]
    item = rec.item
    return RecordSummary(
        input=None if item is None or item.type == "bare" else item.input,
        side=side,
        layers=tuple(layers) or tuple(n for n in store.fields if n not in set(side.values())),
        length=rec.dataset_length,
        view=rec.view,
        key_fn=rec.key_fn,
        record=rec,
    )


def check_frozen(store: ActivationStore, model: Any = None, fingerprint: str | None = None, *, where: str) -> None:
    """Refuse a store whose activations were not computed by ``model``'s frozen part (or have another ``fingerprint``).

    ``model`` is a frozen part from :func:`actstore.split` or the full model (its
    frozen part is then the modules that run up to the recorded layers); the
    store's fingerprint must be that part's, or — for stores written before
    actstore recorded the frozen part only — the whole model's.  Nothing is
    checked when both are None.  Raises :class:`~actstore.StaleStoreError`.
    """
    if model is None and fingerprint is None:
        return
    if fingerprint is not None:
        ok, want = store.fingerprint == fingerprint, fingerprint
    else:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module (a frozen part from actstore.split, or the full "
                            f"model), got {type(model).__name__}")
        rec = read_record(store.attrs, store.path)
        layers = [d.layer for d in rec.layers] if rec is not None else None
        want = frozen_fingerprint(model, layers)
        ok = fingerprint_matches(store.fingerprint, want, model, layers)
    if not ok:
        raise StaleStoreError(
            f"{where}: the store's activations were computed by another frozen part (store fingerprint "
            f"{str(store.fingerprint)[:16]}…, the given model's {want[:16]}…): a frozen weight changed since precompute; "
            "run actstore.precompute(model, dataset, path, overwrite=True) to recompute the store")


# -- datasets -----------------------------------------------------------------------------

_from_numpy = torch.from_numpy


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
    store
        A store or its path.  It is read as of its last commit (a store still
        being written shows what was committed before the dataset was made).
    fields
        The fields in each item (default: all).  An unknown name raises
        ``KeyError`` listing the fields.

    Which side values it serves.  ``ActivationDataset`` serves **rows**, one
    per distinct input, and only row fields.  A store written by
    :func:`actstore.precompute` (format version 3) holds activations only in its
    rows: the side values (labels, ids) belong to dataset positions and are the
    columns of its ``"dataset"`` view — ``store.view_columns("dataset")["label"]``
    gives them in dataset order (never copies), and ``store.view("dataset")`` each
    position's row; :class:`~actstore.CachedDataset` serves both together, one
    item per position.  Stores written before version 3 (or by ``store.append``
    with label fields) hold side values as row fields, served here per row —
    for a row shared by several positions, the first position's values.
    model, fingerprint
        When given, the store must hold what this model's frozen part computes (a
        frozen part from :func:`actstore.split`, or the full model), or carry this
        fingerprint; otherwise :class:`~actstore.StaleStoreError`.  Training the
        head leaves a store valid; changing a frozen weight does not.

    ``ds[i]`` never copies (views of the maps).  A DataLoader with a
    ``batch_size`` calls ``__getitems__`` once per batch; with
    ``collate_fn=actstore.collate`` (or an :class:`ActivationCollate`), or with
    no ``collate_fn`` at all (torch's ``default_collate`` hands actstore's batches
    to :data:`~actstore.collate`), the batch is gathered in one copy:
    ``{field: tensor}``, ragged fields as :class:`PaddedBatch`
    (``ActivationCollate(names={...})`` for plain dicts of tensors with an
    ``attention_mask``).

    Ordering: ``shuffle=True`` shuffles fully; for stores larger than the page
    cache use :class:`~actstore.ChunkShuffleSampler` (chunk-local, seedable).
    Under DistributedDataParallel give the DataLoader a sampler that splits by
    rank — ``ChunkShuffleSampler`` (reads the process group itself) or
    ``torch.utils.data.DistributedSampler`` — and call its ``set_epoch`` each
    epoch; ``shuffle=True`` alone would give every rank the whole store.

    Examples
    --------
    >>> ds = ActivationDataset("faq.store", fields=["hidden"])  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, shuffle=True, collate_fn=actstore.collate)  # doctest: +SKIP
    """

    @renamed_arguments(store_or_path="store")
    def __init__(self, store: Any, fields: Sequence[str] | str | None = None, *, model: Any = None,
                 fingerprint: str | None = None) -> None:
        self._hold(store)
        self.fields = _check_fields(self.store, fields)
        #: every field of the store, in its order: ``ds[i]`` is ``store[i]``, and takes its fast path
        self._all = self.fields == list(self.store.fields)
        #: the store while ``ds[i]`` is ``store[i]`` (every field) and the store is open in this process: the
        #: fast path's one check (None after unpickling, until :meth:`_item` opens the store)
        self._fast: ActivationStore | None = self._store if self._all else None
        check_frozen(self.store, model, fingerprint, where=f"ActivationDataset({self.store.path})")

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return f"ActivationDataset({self.store.path!r}, rows={len(self)}, fields={self.fields})"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` as ``{field: tensor}``: views of the maps (compressed fields: copies)."""
        store = self._fast
        if store is not None and type(i) is int:
            one = store._snap.row1  # store[i]'s own fast path (a one-segment store of one plain fixed field)
            if one is not None:
                arr, name, cls = one
                out = cls()
                try:
                    out[name] = _from_numpy(arr[i])  # (the map holds exactly the store's rows: numpy checks the range)
                except IndexError:
                    raise IndexError(f"index {i} is out of range for a dataset of {len(arr)} items") from None
                return out
            return store[i]  # (builds that fast path where it applies)
        return self._item(i)

    def _item(self, i: int) -> dict[str, torch.Tensor]:
        store = self.store
        if self._all:
            self._fast = store  # (a worker's first item: the store is open now)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        seg, local = store.snapshot.locate(int(i))
        return make_row(row_plan(seg, self.fields), local, store.snapshot.aliases)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fast"] = None
        return state

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """The rows of a batch, gathered later by the collate function.  Never copies."""
        rows = _positions(indices, len(self.store))
        return RowBatch(self, rows, rows)

    def _collate(self, batch: RowBatch, opts: ActivationCollate, shared: bool) -> dict[str, Any]:
        store = self.store
        snap = store.snapshot
        return {n: opts.gather(snap, n, store.fields[n], batch.rows, shared=shared) for n in self.fields}

    def sampler_layout(self) -> tuple[ActivationStore, np.ndarray | None]:
        """(store, row of each position or None for the identity) — for :class:`ChunkShuffleSampler`."""
        return self.store, None
