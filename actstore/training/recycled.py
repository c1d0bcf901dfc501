"""Serving recycled activations where the frozen part used to run: CachedDataset and RecycledEncoder.

:class:`CachedDataset` works at the dataset level (a drop-in for the user's dataset);
:class:`RecycledEncoder` at the module level (a drop-in for the frozen module).

With a RecycledEncoder a training loop needs no separate precompute step: the
first epoch computes every sample with the frozen module (and appends it to the
store when ``append=True``), later epochs read the store.

Keys are content addresses (:func:`actstore.key` of each raw sample), so the
same sample is found whatever batch or position it arrives in.  Pass raw
samples (texts, images) rather than padded batches: the key of a padded row
would depend on the batch it was padded in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from actstore.errors import DatasetMismatchError, MissingRowsError
from actstore.hashing import key as content_key
from actstore.store import ActivationStore
from actstore.training.data import (
    ActivationCollate,
    PrecomputeConfig,
    RowBatch,
    _check_fields,
    _positions,
    _StoreHolder,
    precompute_config,
    row_view,
)
from actstore.training.encoder import RecycledEncoder, output_rows

__all__ = ["CachedDataset", "RecycledEncoder", "output_rows"]  # RecycledEncoder lives in training/encoder.py


# -- the drop-in ------------------------------------------------------------------------------

def _part(item: Any, k: Any) -> Any:
    return item if k is None else item[k]


def _kind_of(value: Any) -> str:
    """How a side value comes back: a python scalar, str, bytes, numpy array or tensor."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return "array" if isinstance(value, np.ndarray) else "tensor"


def _side_item(v: torch.Tensor, kind: str) -> Any:
    """A stored side value (a view) as the dataset item held it."""
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](v.item())
    if kind == "str":
        return bytes(v.numpy()).decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes(v.numpy())
    return v.numpy() if kind == "array" else v


@dataclass(frozen=True)
class _Template:
    """The structure of ``dataset[i]``: its type, parts, which part is the input, which are side fields."""

    kind: str  # "bare", "mapping", "namedtuple", "sequence"
    type: type
    parts: tuple[Any, ...]
    input: Any
    side: Mapping[Any, str]  # part -> field
    kinds: Mapping[Any, str]  # part -> how its value comes back (see _kind_of)

    @classmethod
    def of(cls, item: Any, input: Any, side: Mapping[Any, str], store: ActivationStore, where: str) -> _Template:
        unknown = [f for f in side.values() if f not in store.fields]
        if unknown:
            raise KeyError(f"side fields {unknown} are not in the store; it has {sorted(store.fields)}")
        if input is None or item is None:
            if side and item is not None:
                raise ValueError(f"{where}: side fields {dict(side)} need items with parts, but the input is the whole item")
            return cls("bare", type(item), (), None, {}, {})
        if isinstance(item, Mapping):
            kind, parts = "mapping", tuple(item.keys())
        elif isinstance(item, tuple):
            kind, parts = ("namedtuple" if hasattr(item, "_fields") else "sequence"), tuple(range(len(item)))
            side = {int(k): v for k, v in side.items()}
            input = int(input) % max(len(item), 1)
        else:
            raise DatasetMismatchError(f"{where}: items are {type(item).__name__}, but precompute recorded "
                                       f"input part {input!r} of a tuple or dict item")
        if input not in parts or any(k not in parts for k in side):
            raise DatasetMismatchError(f"{where}: items have parts {list(parts)}; the store records input {input!r} "
                                       f"and side columns {list(side)}")
        return cls(kind, type(item), parts, input, dict(side), {k: _kind_of(item[k]) for k in side})

    def build(self, value: Any, side: Mapping[Any, Any]) -> Any:
        """An item (or batch) of this structure; parts that were not stored are None."""
        if self.kind == "bare":
            return value
        vals = [value if k == self.input else side.get(k) for k in self.parts]
        if self.kind == "mapping":
            d = dict(zip(self.parts, vals, strict=True))
            try:
                return d if self.type is dict else self.type(d)
            except Exception:  # a mapping type that cannot be built from a dict
                return d
        if self.kind == "namedtuple":
            return self.type(*vals)
        return self.type(vals)


_UNSET: Any = object()


class CachedDataset(_StoreHolder, Dataset):  # type: ignore[type-arg]
    """The user's dataset with each item's input replaced by its cached activations.

    Same length and order as ``dataset``; ``ds[i]`` has the structure of
    ``dataset[i]`` (a dict, tuple, namedtuple or the bare input) with the input
    part replaced by the activations (one tensor, or ``{field: tensor}`` when the
    store holds several layers) and the side parts (labels, ids) read from the
    store's side fields.  The original inputs are **not read** after
    construction: position → row comes from the view precompute recorded.

    Parameters
    ----------
    dataset
        The dataset that was precomputed (anything with ``len`` and ``[i]``).
    store_or_path
        The store precompute filled.
    input, side
        Which part of an item was the input (``None``: the whole item; a key or
        an index) and item part → side field; default: what precompute recorded.
    fields
        Activation fields to serve (default: precompute's layers).
    check
        How many seeded-random positions to verify at construction by keying
        ``dataset[i]``'s input with ``key_fn`` and comparing with the stored key.
    index
        ``"view"`` (default): positions map to rows through the store's view;
        ``"keys"``: key every input once now and look the keys up (for stores
        filled by :class:`~actstore.RecycledEncoder`, which records no view).
    fallback
        A frozen module (or :class:`~actstore.RecycledEncoder`) that computes the
        activations of positions with no row: called on a list of inputs, it
        returns a tensor batch, a list of per-row tensors, a
        :class:`~actstore.RaggedBatch`, a ``(padded, mask)`` pair or a dict of
        those per field.  Without one, missing rows raise :class:`MissingRowsError`.

    Raises
    ------
    DatasetMismatchError
        The dataset's length differs from what precompute recorded, or a
        spot-checked input's key differs from the stored row's.
    MissingRowsError
        Positions without a row, and no ``fallback``; the message says how many
        and how to fill them.
    """

    def __init__(self, dataset: Any, store_or_path: Any, *, input: Any = _UNSET, side: Mapping[Any, str] | None = None,
                 fields: Sequence[str] | str | None = None, check: int = 8, seed: int = 0, index: str = "view",
                 fallback: Callable[[list[Any]], Any] | None = None, key_fn: Callable[[Any], bytes] | None = None) -> None:
        self._hold(store_or_path)
        store = self.store
        cfg = precompute_config(store)
        self.input = cfg.input if input is _UNSET else input
        self.side = dict(cfg.side or {}) if side is None else dict(side)
        layer_default = [n for n in (cfg.layers or store.fields) if n not in set(self.side.values())]
        self.fields = _check_fields(store, layer_default if fields is None else fields)
        if key_fn is None and cfg.key_fn not in (None, "actstore.key", "actstore.hashing.key", "actstore.keys.key"):
            raise ValueError(f"CachedDataset({store.path}): precompute keyed the inputs with {cfg.key_fn}; "
                             "pass the same function as key_fn=")
        self.key_fn = key_fn or content_key
        self.fallback = fallback
        self.dataset = dataset
        n = len(dataset)
        where = f"CachedDataset({store.path})"
        if index == "view":
            rows = self._view_rows(store, cfg, n, where)
        elif index == "keys":
            rows = store.lookup([self.key_fn(_part(dataset[i], self.input)) for i in range(n)]) if n else np.empty(0, np.int64)
        else:
            raise ValueError(f"index: expected 'view' or 'keys', got {index!r}")
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        present = np.nonzero(self.rows >= 0)[0]
        gen = np.random.default_rng(seed)
        checked = gen.choice(present, size=min(check, len(present)), replace=False) if len(present) else present
        first = dataset[int(checked[0])] if len(checked) else (dataset[0] if n else None)
        self._template = _Template.of(first, self.input, self.side if n else {}, store, where)
        for p in np.asarray(checked, dtype=np.int64).tolist():
            k = self.key_fn(_part(dataset[p], self.input))
            stored = bytes(store.key_at([self.rows[p]])[0])
            if bytes(k) != stored:
                raise DatasetMismatchError(
                    f"{where}: dataset[{p}]'s input has key {bytes(k).hex()[:16]}…, but the store's row "
                    f"{self.rows[p]} for that position holds {stored.hex()[:16]}…: the dataset changed since "
                    "precompute (edited or reordered); rerun precompute on this dataset (it computes only new "
                    "rows), or pass index='keys' to match items by content"
                )
        missing = int((self.rows < 0).sum())
        if missing and fallback is None:
            first_missing = np.nonzero(self.rows < 0)[0][:5].tolist()
            raise MissingRowsError(
                f"{where}: {missing} of {n} dataset positions have no row in the store (first: {first_missing}); "
                f"fill them with actstore.precompute(model, dataset, {store.path!r}, ...) (or the command "
                f"`actstore precompute ... {store.path}`), which computes only the missing rows, or pass "
                "fallback=frozen_module to compute them on the fly"
            )
        self.missing = missing

    @staticmethod
    def _view_rows(store: ActivationStore, cfg: PrecomputeConfig, n: int, where: str) -> np.ndarray:
        if cfg.view not in store.views:
            raise DatasetMismatchError(
                f"{where}: the store has no {cfg.view!r} view (views: {store.views}): it was not filled by "
                "actstore.precompute from a dataset; pass index='keys' to match items by content instead"
            )
        rows = store.view(cfg.view)
        # The view is rewritten by every precompute run; attrs keep the first run's length.
        recorded = len(rows)
        if n != recorded:
            raise DatasetMismatchError(
                f"{where}: the dataset has {n} items but precompute recorded {recorded}: the dataset changed; "
                "rerun precompute on it (it computes only the new rows) or pass index='keys'"
            )
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"CachedDataset({self.store.path!r}, items={len(self)}, fields={self.fields}, missing={self.missing})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if not self.missing:
            state["dataset"] = None  # never read again: do not ship it to workers
        return state

    def sampler_layout(self) -> tuple[ActivationStore, np.ndarray | None]:
        """(store, row of each position) — for :class:`ChunkShuffleSampler`."""
        return self.store, self.rows

    def __getitem__(self, i: int) -> Any:
        """``dataset[i]`` with its input replaced by the activations.  Never copies (computed rows aside)."""
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        p = int(_positions([i], len(self.rows))[0])
        row = int(self.rows[p])
        store, t = self.store, self._template
        if row < 0:
            acts, side = self._compute([p])
            value = {n: acts[n][0] for n in self.fields}
            side_vals = {k: side[k][0] for k in t.side}  # the item's own parts, as they are
        else:
            seg, local = store._snap.locate(row)
            value, side_vals = {}, {}
            for name in (*self.fields, *t.side.values()):
                v = row_view(seg, local, name, store.fields[name])
                if name in self.fields:
                    value[name] = v
                for k, fn in t.side.items():
                    if fn == name:
                        side_vals[k] = _side_item(v, t.kinds[k])
        return t.build(value[self.fields[0]] if len(self.fields) == 1 else value, side_vals)

    def __getitems__(self, indices: Sequence[int]) -> RowBatch:
        """The rows of a batch (computing missing ones with the fallback).  Never copies stored rows."""
        pos = _positions(indices, len(self.rows))
        rows = self.rows[pos]
        computed: dict[str, dict[int, torch.Tensor]] = {}
        miss = np.nonzero(rows < 0)[0]
        if len(miss):
            acts, side = self._compute(pos[miss].tolist())
            for name, vals in acts.items():
                computed[name] = dict(zip(miss.tolist(), vals, strict=True))
            for k, vals in side.items():
                computed[f"side:{k}"] = dict(zip(miss.tolist(), vals, strict=True))  # raw item parts
        return RowBatch(self, pos, rows, computed)

    def _compute(self, positions: list[int]) -> tuple[dict[str, list[torch.Tensor]], dict[Any, list[Any]]]:
        if self.fallback is None or self.dataset is None:
            raise MissingRowsError(f"positions {positions[:5]} have no row in the store and no fallback was given")
        items = [self.dataset[p] for p in positions]
        inputs = [_part(it, self.input) for it in items]
        if hasattr(self.fallback, "encode_rows"):
            acts = self.fallback.encode_rows(inputs, self.fields)
        else:
            with torch.no_grad():
                out = self.fallback(inputs)
            acts = output_rows(out, self.fields, len(inputs))
        side = {k: [_part(it, k) for it in items] for k in self._template.side}
        return acts, side

    def _collate(self, batch: RowBatch, opts: ActivationCollate, shared: bool) -> Any:
        store, t = self.store, self._template
        snap = store._snap
        acts = {n: opts.gather(snap, n, store.fields[n], batch.rows, shared=shared, extra=batch.computed.get(n))
                for n in self.fields}
        side: dict[Any, Any] = {}
        for k, fn in t.side.items():
            raw = batch.computed.get(f"side:{k}", {})
            if t.kinds[k] in ("str", "bytes"):  # a list, as default_collate gives for strings
                side[k] = [raw[p] if r < 0 else _side_item(row_view(*snap.locate(r), fn, store.fields[fn]), t.kinds[k])
                           for p, r in enumerate(batch.rows.tolist())]
            else:
                extra = {p: torch.as_tensor(v) for p, v in raw.items()}
                side[k] = opts.gather(snap, fn, store.fields[fn], batch.rows, shared=shared, extra=extra)
        return t.build(acts[self.fields[0]] if len(self.fields) == 1 else acts, side)
