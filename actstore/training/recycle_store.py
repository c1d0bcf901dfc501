"""The store side of :func:`actstore.recycle`: open or create, check, look up, append, commit, close.

:class:`RecycleStore` holds what the routed forward needs from the store and
nothing of the model (a ``weakref.finalize`` on the recycled model calls its
:meth:`RecycleStore.close`, so it must not keep the model alive).  Rows are keyed
by the model inputs as fed (:func:`actstore.precompute.inputs.input_keys`, the
scheme precompute, :class:`~actstore.CachedDataset` and
:class:`~actstore.RecycledEncoder` use), so the stores of the four serve each
other.  A store created here carries a precompute record naming the split point
as its one layer (``item`` unset: no dataset view), so ``precompute(model, ...,
layers=at)`` resumes it and computes only what is missing.

Writers: the process that opened the store appends to it; a torchrun rank other
than 0 and a DataLoader worker append to a part of their own
(:mod:`actstore.training.worker_parts`), which the writer adopts when it commits
or closes.  Appended rows are served from memory until committed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actstore.environment import environment
from actstore.errors import StaleStoreError, StoreError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.record import RECORD_ATTR, LayerRecord, PrecomputeRecord, read_record
from actstore.models.capture import canonical_name
from actstore.models.fingerprint import fingerprint_matches
from actstore.store import ActivationStore, create
from actstore.store import open as open_store
from actstore.training.checks import KEYS_ATTR, NO_COLLATE
from actstore.training.worker_parts import WorkerPart, adopt_parts

__all__ = ["PENDING_BYTES", "RecycleStore", "layer_field"]

#: Appended rows kept in memory (served until committed) commit once they hold this many bytes.
PENDING_BYTES = 256 << 20


def layer_field(store: ActivationStore, names: set[str], model: torch.nn.Module, at: str) -> str:
    """The store's field holding the output of the split point ``at`` (one of ``names``: the same module named from
    the model or from its base).  Raises :class:`StoreError` naming the store's layers when none is."""
    rec = read_record(store.attrs, store.path)
    layers = {d.layer: d.field for d in rec.layers} if rec is not None else {}
    if not layers:
        made = store.attrs.get("recycle")
        if isinstance(made, Mapping) and isinstance(made.get("layer"), str):
            layers = {made["layer"]: str(made.get("field", made["layer"]))}
    for layer, field in layers.items():
        if (layer in names or canonical_name(model, layer) in names) and field in store.fields:
            return field
    if not layers and len(store.fields) == 1:  # a store of the user's own (RecycledEncoder's): one field, no record
        return next(iter(store.fields))
    raise StoreError(
        f"{store.path}: the store holds the layers {sorted(layers) or sorted(store.fields)}, not the split point "
        f"{at!r} that recycle serves: it was made for another split point or field; recycle at the store's layer "
        "(at=...), or use another path")


class RecycleStore:
    """The store of a recycled model: lookup (committed and appended rows), append, commit, close.

    Parameters
    ----------
    store
        A path (created on the first append when no store is there) or an
        open :class:`~actstore.ActivationStore` (``mode="a"`` to append; a
        read-only one serves hits and computes misses without storing them).
    field
        The field name of a store created here (the split point's name).
    fingerprint
        The frozen part's fingerprint (recorded when creating; checked against
        an existing store: :class:`StaleStoreError`).
    commit_every, max_rows
        Commit every ``commit_every`` appended rows; store at most
        ``max_rows`` rows (beyond, misses are computed and not stored: one warning).
    """

    def __init__(self, store: ActivationStore | str | os.PathLike[str], *, at: str, names: set[str],
                 model: torch.nn.Module, fingerprint: str, frozen: torch.nn.Module, commit_every: int = 4096,
                 max_rows: int | None = None, store_dtype: Any = None) -> None:
        if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
            raise ValueError(f"commit_every: expected a number of rows >= 1, got {commit_every!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise ValueError(f"max_rows: expected None or a number of rows >= 0, got {max_rows!r}")
        self.at, self.fingerprint = at, fingerprint
        self.commit_every, self.max_rows = commit_every, max_rows
        self.store_dtype = None if store_dtype is None else dtype_name(store_dtype)
        self.pending: dict[bytes, torch.Tensor] = {}
        self.pending_bytes = 0
        self.appended = 0
        self.capped = False
        self._owner = os.getpid()
        env = environment()
        self._rank = env.rank if env.world > 1 else 0
        self._store: ActivationStore | None
        if isinstance(store, ActivationStore):
            self.path, self._store, self._own = store.path, store, False
        else:
            self.path, self._own = os.path.abspath(os.fspath(store)), True
            exists = os.path.exists(os.path.join(self.path, "zarr.json"))
            self._store = open_store(self.path, mode="a" if self._rank == 0 else "r") if exists else None
        self.writable = self._store is None or self._store.mode == "a" or self._rank > 0
        self.field = at
        if self._store is not None:
            try:
                self.field = layer_field(self._store, names, model, at)  # another split point: named as such
                self._check(self._store, names, model, frozen)
            except BaseException:
                if self._own:
                    self._store.close()  # release the lock: the model is not recycled
                raise
        self._part = WorkerPart(self.path)
        if self._rank == 0 and self._own:
            self._store = adopt_parts(self.path, self._store)  # rows of an earlier run's ranks or workers
        self.rows_at_open = len(self._store) if self._store is not None else 0

    def _check(self, store: ActivationStore, names: set[str], model: torch.nn.Module, frozen: torch.nn.Module) -> None:
        if store.fingerprint is not None and not fingerprint_matches(store.fingerprint, self.fingerprint, frozen):
            raise StaleStoreError(
                f"{store.path}: the store's rows were computed by another frozen part (store fingerprint "
                f"{store.fingerprint[:16]}…, this model's frozen part up to {self.at!r} is {self.fingerprint[:16]}…): "
                "a frozen weight changed since the store was filled, or it was made for another split point; "
                "use another path, or delete the store to recompute it")

    def check_fresh(self, fingerprint: str, frozen: torch.nn.Module) -> None:
        """Refuse a frozen part whose weights changed since :func:`recycle` (checked at a forward where they may have)."""
        if fingerprint != self.fingerprint:
            raise StaleStoreError(
                f"{self.path}: a frozen weight below {self.at!r} changed since recycle() (fingerprint "
                f"{self.fingerprint[:16]}… then, {fingerprint[:16]}… now): the store's rows no longer match the "
                "model; call actstore.unrecycle(model), then recycle it with another store path")

    # -- reading ---------------------------------------------------------------------------
    @property
    def store(self) -> ActivationStore | None:
        """The open store (None until a store created here receives its first rows)."""
        return self._store

    def __len__(self) -> int:
        return (len(self._store) + self._store.pending) if self._store is not None else 0

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Committed row of each key, -1 where there is none.  Never copies rows."""
        if self._store is None:
            return np.full(len(keys), -1, np.int64)
        return self._store.lookup(keys)

    @property
    def stored_field(self) -> Field | None:
        return self._store.fields.get(self.field) if self._store is not None else None

    # -- writing ---------------------------------------------------------------------------
    def append(self, keys: np.ndarray, rows: list[torch.Tensor], ragged: bool) -> None:
        """Append computed rows (per-sample CPU tensors) under their keys; commit every ``commit_every`` rows."""
        if not self.writable:
            return
        if self.max_rows is not None:
            room = max(self.max_rows - len(self), 0)
            if room < len(rows):
                if not self.capped:
                    warnings.warn(
                        f"{self.path}: the store reached max_rows={self.max_rows}; further misses are computed and "
                        "not stored (raise max_rows=, or see whether the inputs ever repeat)", RuntimeWarning,
                        stacklevel=4)
                    self.capped = True
                keys, rows = keys[:room], rows[:room]
            if not len(rows):
                return
        field = self.stored_field or Field(
            ((None,) + tuple(rows[0].shape[1:])) if ragged else tuple(rows[0].shape),
            self.store_dtype or dtype_name(rows[0].dtype))
        values = {self.field: rows if field.ragged else torch.stack(rows)}
        worker = os.getpid() != self._owner or self._rank > 0
        attrs = self._attrs(field)
        if worker:  # a DataLoader worker or a torchrun rank > 0: its own part, adopted by the writer
            main = self._store
            if self._part.append(keys, values, {self.field: field}, self.fingerprint,
                                 main.attrs if main is not None else attrs, self.commit_every):
                self.pending.clear()
                self.pending_bytes = 0
        else:
            if self._store is None:
                self._store = create(self.path, {self.field: field}, fingerprint=self.fingerprint, exist_ok=True,
                                     attrs=attrs)
            self._store.append(keys, values)
        for k, r in zip(keys, rows, strict=True):
            self.pending[bytes(k)] = r
            self.pending_bytes += r.numel() * r.element_size()
        self.appended += len(rows)
        full = self.pending_bytes >= PENDING_BYTES  # rows served from memory until committed: bounded
        if not worker and self._store is not None and (self._store.pending >= self.commit_every or full):
            self.commit()
        elif worker and full:
            self.pending.clear()
            self.pending_bytes = 0

    def _attrs(self, field: Field) -> dict[str, Any]:
        record = PrecomputeRecord(layers=(LayerRecord(self.at, self.field, field.ragged),), item=None,
                                  key_fn="actstore.key", collate_fn=NO_COLLATE, keys="inputs")
        return {RECORD_ATTR: record.to_json(), "recycle": {"layer": self.at, "field": self.field},
                KEYS_ATTR: {"layers": [self.field], "keys": "inputs", "collate_fn": NO_COLLATE}}

    def commit(self) -> int | None:
        """Commit appended rows (adopting finished parts of ranks and workers); returns the generation or None."""
        if os.getpid() != self._owner or self._rank > 0:
            self.pending.clear()
            self.pending_bytes = 0
            return self._part.commit()
        if self._store is not None and self._store.mode == "a":
            self._store.commit()
        if self._own:
            self._store = adopt_parts(self.path, self._store)
        self.pending.clear()
        self.pending_bytes = 0
        return self._store.generation if self._store is not None and self._store.mode == "a" else None

    def close(self) -> None:
        """Commit and release the store's writer lock (idempotent; never raises at garbage collection)."""
        if os.getpid() != self._owner or self._rank > 0:
            self._part.close()
        elif self._store is not None and self._store.mode == "a":
            self.commit()
        if self._store is not None and self._own:
            self._store.close()
        self.pending.clear()
        self.pending_bytes = 0
