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

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from actstore.engine.gather import row_view
from actstore.engine.ragged import PaddedBatch, RaggedBatch
from actstore.engine.reader import normalize_keys
from actstore.errors import DatasetMismatchError, MissingRowsError, StaleStoreError, StoreError, StoreNotFoundError
from actstore.format.manifest import Field, dtype_name
from actstore.hashing import fingerprint as model_fingerprint
from actstore.hashing import key as content_key
from actstore.precompute.items import ItemLayout, decode_item, decode_side, item_part
from actstore.store import ActivationStore, create
from actstore.store import open as open_store
from actstore.training.collate import ActivationCollate, RowBatch
from actstore.training.datasets import (
    PrecomputeConfig,
    _check_fields,
    _positions,
    _StoreHolder,
    precompute_config,
)

__all__ = ["CachedDataset", "RecycledEncoder", "output_rows"]


def _is_padded_pair(value: Any) -> bool:
    if not (isinstance(value, tuple) and len(value) == 2 and not isinstance(value, PaddedBatch)):
        return False
    values, mask = value
    return (isinstance(values, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.ndim == 2
            and values.ndim >= 2 and tuple(mask.shape) == tuple(values.shape[:2]) and not mask.is_floating_point())


def _rows_of(value: Any, n: int, name: str, ragged: dict[str, bool] | None) -> list[torch.Tensor]:
    flag: bool
    if isinstance(value, PaddedBatch):
        lens = value.lengths.tolist()
        rows, flag = [value.values[i, :ln] for i, ln in enumerate(lens)], True
    elif _is_padded_pair(value):
        padded, mask = value
        lens = mask.sum(1).tolist()  # right padding, as tokenizers do by default
        rows, flag = [padded[i, : int(ln)] for i, ln in enumerate(lens)], True
    elif isinstance(value, RaggedBatch):
        rows, flag = [value[i] for i in range(len(value))], True
    elif isinstance(value, torch.Tensor):
        rows, flag = list(value.unbind(0)) if value.ndim else [], False
    elif isinstance(value, (list, tuple)):
        rows = [torch.as_tensor(r) for r in value]
        flag = len({tuple(r.shape[:1]) for r in rows}) > 1
    else:
        raise TypeError(
            f"the frozen module's output for {name!r} is a {type(value).__name__}; expected a tensor batch, a list "
            "of per-row tensors, an actstore.RaggedBatch, a PaddedBatch or a (padded, mask) pair"
        )
    if len(rows) != n:
        raise ValueError(f"the frozen module returned {len(rows)} rows of {name!r} for {n} inputs")
    if ragged is not None:
        ragged[name] = flag
    return [r.detach().cpu() for r in rows]


def output_rows(output: Any, names: Sequence[str], n: int, ragged: dict[str, bool] | None = None) -> dict[str, list[torch.Tensor]]:
    """Split a frozen module's batch output into per-row CPU tensors, per field.  May copy (device → host).

    ``output`` is one batch (for a single field) or a mapping field → batch; a
    batch is a tensor ``(n, ...)``, a list of per-row tensors, a
    :class:`~actstore.RaggedBatch`, a :class:`PaddedBatch` or a ``(padded, mask)``
    pair (right padding).  ``ragged``, if given, is filled with whether each
    field came in a variable-length form.
    """
    if isinstance(output, Mapping):
        missing = [nm for nm in names if nm not in output]
        if missing:
            raise KeyError(f"the frozen module's output has no {missing}; it has {sorted(output)}")
        return {nm: _rows_of(output[nm], n, nm, ragged) for nm in names}
    if len(names) != 1:
        raise TypeError(f"the frozen module returned one batch, but {list(names)} are wanted: return a dict field -> batch")
    return {names[0]: _rows_of(output, n, names[0], ragged)}


def _select(inputs: Any, idx: list[int]) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.as_tensor(idx, dtype=torch.long, device=inputs.device)]
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _select(v, idx) for k, v in inputs.items()}) if type(inputs) is dict else \
            {k: _select(v, idx) for k, v in inputs.items()}
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def _samples(inputs: Any) -> list[Any]:
    if isinstance(inputs, Mapping):
        n = len(next(iter(inputs.values())))
        return [{k: v[i] for k, v in inputs.items()} for i in range(n)]
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return list(inputs)
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    raise TypeError(f"inputs: expected a list of samples, a tensor batch or a dict of batched tensors, "
                    f"got {type(inputs).__name__}")


# -- the drop-in ------------------------------------------------------------------------------

_UNSET: Any = object()


#: Elements of an array input that still count as cheap to key at construction.
_CHEAP_ELEMENTS = 4096


def _cheap_to_key(x: Any) -> bool:
    """Whether keying every item like ``x`` at construction is cheap (about a second per million short strings)."""
    if isinstance(x, (str, bytes, bytearray, int, float, bool, np.number)):
        return True
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return int(np.prod(x.shape)) <= _CHEAP_ELEMENTS
    if isinstance(x, Mapping):
        return all(_cheap_to_key(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return len(x) <= _CHEAP_ELEMENTS and all(isinstance(v, (int, float, bool, str)) for v in x)
    return False


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
        Which items to verify at construction by keying ``dataset[i]``'s input
        with ``key_fn`` and comparing with the stored key: ``"auto"`` (default)
        checks every item when inputs are cheap to key (str, bytes, numbers,
        token ids and arrays of at most 4,096 elements, dicts of those) and 8
        seeded-random positions otherwise; ``"all"`` every item; an int that
        many seeded-random positions (spot checks).  ``.checked`` says how many
        positions were checked, ``.check_mode`` whether all or a spot check.
    index
        ``"view"`` (default): positions map to rows through the store's view;
        ``"keys"``: key every input once now and look the keys up (for stores
        filled by :class:`~actstore.RecycledEncoder`, which records no view).
    input_name
        For dict items: the key the activations get (e.g. ``"hidden_states"``,
        an argument of the head's ``forward``, which ``transformers.Trainer``
        keeps); default the input's own key.
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
                 fields: Sequence[str] | str | None = None, check: int | str = "auto", seed: int = 0, index: str = "view",
                 fallback: Callable[[list[Any]], Any] | None = None, key_fn: Callable[[Any], bytes] | None = None,
                 input_name: str | None = None) -> None:
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
            rows = store.lookup([self.key_fn(item_part(dataset[i], self.input)) for i in range(n)]) if n else np.empty(0, np.int64)
        else:
            raise ValueError(f"index: expected 'view' or 'keys', got {index!r}")
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        present = np.nonzero(self.rows >= 0)[0]
        first = dataset[int(present[0])] if len(present) else (dataset[0] if n else None)
        unknown = [f for f in self.side.values() if f not in store.fields]
        if unknown:
            raise KeyError(f"side fields {unknown} are not in the store; it has {sorted(store.fields)}")
        recorded = cfg.record.item if cfg.record is not None else None
        self._template = ItemLayout.of(first, self.input, self.side if n else {}, where, recorded)
        if input_name is not None:
            if self._template.kind != "mapping":
                raise ValueError(f"input_name={input_name!r}: renames the input key of dict items, but the items are "
                                 f"{self._template.kind}")
            self._template = replace(self._template, input_name=input_name)
        if check == "auto":
            full = n > 0 and _cheap_to_key(item_part(first, self.input))
            spot = 8
        elif check == "all":
            full, spot = True, 0
        elif isinstance(check, int) and not isinstance(check, bool) and check >= 0:
            full, spot = False, check
        else:
            raise ValueError(f"check: expected 'auto', 'all' or a number of spot checks >= 0, got {check!r}")
        if index == "keys":  # every item was keyed to find its row: nothing left to check
            positions, full = present[:0], True
        elif full:
            positions = present
        else:
            gen = np.random.default_rng(seed)
            positions = np.sort(gen.choice(present, size=min(spot, len(present)), replace=False)) if len(present) \
                else present
        self._check_keys(dataset, positions, first, where)
        #: dataset positions whose key was checked at construction, and how ("all", "spot" or "keys")
        self.checked = len(present) if index == "keys" else len(positions)
        self.check_mode = "keys" if index == "keys" else "all" if full else "spot"
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

    def _check_keys(self, dataset: Any, positions: np.ndarray, first: Any, where: str) -> None:
        """Key ``dataset[p]``'s input for each position and compare with the stored keys (one gather)."""
        if not len(positions):
            return
        store = self.store
        first_type = type(first)
        buf = bytearray()
        for p in positions.tolist():
            item = dataset[p]
            if type(item) is not first_type:
                raise ValueError(f"{where}: dataset[{p}] is a {type(item).__name__}, but dataset[{int(positions[0])}] "
                                 f"is a {first_type.__name__}: items must all have one type")
            k = self.key_fn(item_part(item, self.input))
            if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != 32:
                raise TypeError(f"key_fn must return 32 bytes (like actstore.key), got {type(k).__name__}")
            buf += k
        keys = np.frombuffer(bytes(buf), np.uint8).reshape(-1, 32)
        stored = store.key_at(self.rows[positions])
        bad = np.flatnonzero((keys != stored).any(axis=1))
        if len(bad):
            p = int(positions[bad[0]])
            more = f" ({len(bad) - 1} more of the {len(positions)} checked positions differ too)" if len(bad) > 1 else ""
            raise DatasetMismatchError(
                f"{where}: dataset[{p}]'s input has key {keys[bad[0]].tobytes().hex()[:16]}…, but the store's row "
                f"{self.rows[p]} for that position holds {stored[bad[0]].tobytes().hex()[:16]}…{more}: the dataset "
                "changed since precompute (edited or reordered); rerun precompute on this dataset (it computes only "
                "new rows), or pass index='keys' to match items by content"
            )

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
        return (f"CachedDataset({self.store.path!r}, items={len(self)}, fields={self.fields}, missing={self.missing}, "
                f"checked={self.checked} ({self.check_mode}))")

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
            seg, local = store.snapshot.locate(row)
            value, side_vals = {}, {}
            for name in (*self.fields, *t.side.values()):
                v = row_view(seg, local, name, store.fields[name])
                if name in self.fields:
                    value[name] = v
                for k, fn in t.side.items():
                    if fn == name:
                        side_vals[k] = decode_side(v, t.kinds[k])
        return decode_item(t, value[self.fields[0]] if len(self.fields) == 1 else value, side_vals)

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
        inputs = [item_part(it, self.input) for it in items]
        if hasattr(self.fallback, "encode_rows"):
            acts = self.fallback.encode_rows(inputs, self.fields)
        else:
            with torch.no_grad():
                out = self.fallback(inputs)
            acts = output_rows(out, self.fields, len(inputs))
        side = {k: [item_part(it, k) for it in items] for k in self._template.side}
        return acts, side

    def _collate(self, batch: RowBatch, opts: ActivationCollate, shared: bool) -> Any:
        store, t = self.store, self._template
        snap = store.snapshot
        acts = {n: opts.gather(snap, n, store.fields[n], batch.rows, shared=shared, extra=batch.computed.get(n))
                for n in self.fields}
        side: dict[Any, Any] = {}
        for k, fn in t.side.items():
            raw = batch.computed.get(f"side:{k}", {})
            if t.kinds[k] in ("str", "bytes"):  # a list, as default_collate gives for strings
                side[k] = [raw[p] if r < 0 else decode_side(row_view(*snap.locate(r), fn, store.fields[fn]), t.kinds[k])
                           for p, r in enumerate(batch.rows.tolist())]
            else:
                extra = {p: torch.as_tensor(v) for p, v in raw.items()}
                side[k] = opts.gather(snap, fn, store.fields[fn], batch.rows, shared=shared, extra=extra)
        return decode_item(t, acts[self.fields[0]] if len(self.fields) == 1 else acts, side)


class RecycledEncoder(nn.Module):
    """Stands in for the frozen part of a model: cached activations from the store, misses computed.

    Parameters
    ----------
    frozen
        The frozen module.  Called (under ``torch.no_grad()``) on the sub-batch of
        inputs whose keys are not in the store; it returns what
        :func:`output_rows` accepts — for a BERT-style encoder, ``(hidden, mask)``
        or a :class:`PaddedBatch`, so that padding is not stored.  It is kept in
        ``eval()`` mode (dropout would make computed rows differ from stored ones).
    store
        An :class:`~actstore.ActivationStore` or a path.  With ``append=True`` a
        path that holds no store yet is created on the first miss, with fields
        inferred from the frozen module's output and its
        :func:`~actstore.fingerprint` recorded.
    key_fn
        Sample → 32-byte key (default :func:`actstore.key`).
    append
        Append computed rows to the store (needs a writable store: a path, or one
        opened with ``mode="a"``).  Rows are committed every ``commit_every`` rows
        and at :meth:`close`; until then they are served from memory.
    fields
        Fields to return (default: precompute's layers, or all fields; for a new
        store ``{"activations": ...}``).  A mapping name → :class:`~actstore.Field`
        fixes the fields of a store created here.
    store_dtype
        dtype of a store created here (default: the output's dtype).
    dtype, pad_to_multiple_of
        As in :class:`~actstore.ActivationCollate`, for the returned batch.
    device
        Where outputs go (default: the device of ``frozen``'s parameters).
    check_fingerprint
        Refuse a store whose recorded :func:`~actstore.fingerprint` is not
        ``frozen``'s (:class:`~actstore.StaleStoreError`).  Default: check stores
        that a RecycledEncoder created; a precompute store records the
        fingerprint of the whole model precompute ran, which differs from a
        frozen part split off it, so it is checked only with ``True``.

    ``forward(inputs=None, *, keys=None)`` returns, per field, a tensor
    ``(n, *shape)`` (fixed fields) or a :class:`PaddedBatch` (ragged), a dict
    when there are several fields.  Always copies (into the batch).  Only keys
    are needed when every key is stored; a miss without inputs raises
    :class:`MissingRowsError`.  ``.hits``, ``.misses`` (samples computed) and
    ``.hit_rate`` count since construction or :meth:`reset_stats`.

    Examples
    --------
    >>> enc = RecycledEncoder(frozen, "cache.store", append=True)  # doctest: +SKIP
    >>> for epoch in range(3):  # doctest: +SKIP
    ...     for texts, labels in loader:
    ...         hidden, mask, _ = enc(texts)
    ...         loss = loss_fn(head(hidden, mask), labels)
    >>> enc.close(); enc.hit_rate  # doctest: +SKIP
    """

    def __init__(self, frozen: Callable[..., Any], store: ActivationStore | str | os.PathLike[str],
                 key_fn: Callable[[Any], bytes] | None = None, append: bool = False, *,
                 fields: Sequence[str] | Mapping[str, Field] | str | None = None, store_dtype: Any = None,
                 dtype: torch.dtype | None = None, pad_to_multiple_of: int | None = None, commit_every: int = 4096,
                 device: torch.device | str | None = None, check_fingerprint: bool | None = None) -> None:
        super().__init__()
        self.frozen = frozen
        if isinstance(frozen, nn.Module):
            frozen.eval()
        self.key_fn = key_fn or content_key
        self.append = bool(append)
        self.commit_every = int(commit_every)
        self.collate = ActivationCollate(dtype, pad_to_multiple_of)
        self.store_dtype = None if store_dtype is None else dtype_name(store_dtype)
        self.check_fingerprint = check_fingerprint
        self._device = torch.device(device) if device is not None else None
        self._pending: dict[bytes, dict[str, torch.Tensor]] = {}
        self._fingerprint: str | None = None
        self._create_fields = dict(fields) if isinstance(fields, Mapping) else None
        self.hits = 0
        self.misses = 0
        self._store: ActivationStore | None
        if isinstance(store, ActivationStore):
            self.path = store.path
            if self.append and store.mode != "a":
                raise StoreError(f"{store.path}: append=True needs a writable store; open it with "
                                 "actstore.open(path, mode='a') or pass its path")
            self._store = store
        else:
            self.path = os.path.abspath(os.fspath(store))
            exists = os.path.exists(os.path.join(self.path, "zarr.json"))
            if not exists and not self.append:
                raise StoreNotFoundError(f"{self.path}: no store here; pass append=True to create it from the "
                                         "frozen module's outputs, or fill it with actstore.precompute first")
            self._store = open_store(self.path, mode="a" if self.append else "r") if exists else None
        if self._store is not None:
            self._check_store(self._store)
            names = fields if isinstance(fields, (list, tuple, str)) else None
            cfg = precompute_config(self._store)
            side = set((cfg.side or {}).values())
            default = [n for n in (cfg.layers or self._store.fields) if n not in side]
            self.names = [names] if isinstance(names, str) else list(names or default)
            unknown = [n for n in self.names if n not in self._store.fields]
            if unknown:
                raise KeyError(f"fields {unknown} are not in the store {self.path}; it has {sorted(self._store.fields)}")
            if self.append and set(self._store.fields) != set(self.names):
                raise StoreError(
                    f"{self.path}: append=True needs a store whose fields are exactly the frozen module's outputs "
                    f"{self.names}; this one also has {sorted(set(self._store.fields) - set(self.names))}"
                )
        else:
            self.names = list(self._create_fields or ([fields] if isinstance(fields, str) else fields or ["activations"]))

    # -- statistics -----------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        """Hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset_stats(self) -> None:
        self.hits = self.misses = 0

    @property
    def store(self) -> ActivationStore | None:
        """The store (None until a store created here receives its first rows)."""
        return self._store

    def extra_repr(self) -> str:
        return f"store={self.path!r}, append={self.append}, hits={self.hits}, misses={self.misses}"

    def train(self, mode: bool = True) -> RecycledEncoder:
        super().train(mode)
        if isinstance(self.frozen, nn.Module):
            self.frozen.eval()  # the frozen part never trains
        return self

    def _model_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.frozen)  # type: ignore[arg-type]
        return self._fingerprint

    def _check_store(self, store: ActivationStore) -> None:
        check = self.check_fingerprint
        if check is None:
            check = "recycled_encoder" in store.attrs
        if (check and store.fingerprint is not None and isinstance(self.frozen, nn.Module)
                and store.fingerprint != self._model_fingerprint()):
            raise StaleStoreError(
                f"{store.path}: the store was computed by another model ({store.fingerprint[:16]}…, this frozen "
                f"module is {self._model_fingerprint()[:16]}…); use a new path, or pass check_fingerprint=False"
            )

    # -- the work ------------------------------------------------------------------------------
    def _keys(self, inputs: Any, keys: Any) -> np.ndarray:
        if keys is not None:
            return normalize_keys(list(keys) if isinstance(keys, tuple) else keys)
        if inputs is None:
            raise TypeError("RecycledEncoder: pass the batch of inputs, or keys=")
        return normalize_keys([self.key_fn(s) for s in _samples(inputs)])

    def _resolve(self, inputs: Any, keys: Any) -> tuple[np.ndarray, dict[str, dict[int, torch.Tensor]]]:
        """Rows of stored keys (-1 elsewhere) and the rows served from memory or computed, per field."""
        karr = self._keys(inputs, keys)
        n = len(karr)
        rows = self._store.lookup(karr) if self._store is not None else np.full(n, -1, np.int64)
        extra: dict[str, dict[int, torch.Tensor]] = {name: {} for name in self.names}
        todo: dict[bytes, list[int]] = {}
        for p in np.nonzero(rows < 0)[0].tolist():
            kb = bytes(karr[p])
            got = self._pending.get(kb)
            if got is not None:
                for name in self.names:
                    extra[name][p] = got[name]
            else:
                todo.setdefault(kb, []).append(p)
        self.misses += len(todo)
        self.hits += n - len(todo)
        if todo:
            if inputs is None:
                raise MissingRowsError(f"{len(todo)} of {n} keys are not in the store {self.path} and no inputs "
                                       "were given to compute them")
            first = [ps[0] for ps in todo.values()]
            ragged: dict[str, bool] = {}
            with torch.no_grad():
                out = self.frozen(_select(inputs, first))
            produced = output_rows(out, self.names, len(first), ragged)
            for j, ps in enumerate(todo.values()):
                for name in self.names:
                    for p in ps:
                        extra[name][p] = produced[name][j]
            if self.append:
                self._append(karr[first], produced, ragged)
        return rows, extra

    def _append(self, karr: np.ndarray, produced: dict[str, list[torch.Tensor]], ragged: dict[str, bool]) -> None:
        if self._store is None:
            fields = self._create_fields or {
                name: Field(((None,) + tuple(rows[0].shape[1:])) if ragged[name] else tuple(rows[0].shape),
                            self.store_dtype or dtype_name(rows[0].dtype))
                for name, rows in produced.items()
            }
            fp = self._model_fingerprint() if isinstance(self.frozen, nn.Module) else None
            self._store = create(self.path, fields, fingerprint=fp, exist_ok=True,
                                 attrs={"recycled_encoder": {"layers": list(fields)}})
        store = self._store
        values = {name: rows if store.fields[name].ragged else torch.stack(rows) for name, rows in produced.items()}
        store.append(karr, values)
        for i, k in enumerate(karr):
            self._pending[bytes(k)] = {name: produced[name][i] for name in self.names}
        if store.pending >= self.commit_every:
            self.commit()

    def _field(self, name: str, extra: Mapping[int, torch.Tensor]) -> Field:
        if self._store is not None:
            return self._store.fields[name]
        sample = next(iter(extra.values()))  # no store yet: every row was computed
        shape = (None, *sample.shape[1:]) if sample.ndim >= 1 and len({len(t) for t in extra.values()}) > 1 else sample.shape
        return Field(tuple(shape), dtype_name(sample.dtype))

    def forward(self, inputs: Any = None, *, keys: Any = None) -> Any:
        """Activations of a batch: stored rows gathered, misses computed (and appended)."""
        rows, extra = self._resolve(inputs, keys)
        snap = self._store._snap if self._store is not None else None
        out = {name: self.collate.gather(snap, name, self._field(name, extra[name]), rows, extra=extra[name])
               for name in self.names}
        device = self._device or _module_device(self.frozen)
        if device is not None and device.type != "cpu":
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out[self.names[0]] if len(self.names) == 1 else out

    def encode_rows(self, inputs: Any, names: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """Per-row activations of ``inputs`` (views for stored rows, computed tensors for misses).  CPU."""
        rows, extra = self._resolve(inputs, None)
        names = list(names or self.names)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        snap = self._store._snap if self._store is not None else None
        for p, r in enumerate(rows.tolist()):
            loc = snap.locate(r) if r >= 0 and snap is not None else None
            for name in names:
                out[name].append(row_view(loc[0], loc[1], name, self._store.fields[name]) if loc  # type: ignore[union-attr]
                                 else extra[name][p])
        return out

    def commit(self) -> int | None:
        """Commit appended rows (they become visible to readers).  Returns the generation."""
        if self._store is None or self._store.mode != "a":
            return None
        gen = self._store.commit()
        self._pending.clear()
        return gen

    def close(self) -> None:
        """Commit appended rows and close the store (idempotent)."""
        if self._store is not None:
            if self._store.mode == "a":
                self.commit()
            self._store.close()

    def __enter__(self) -> RecycledEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return None
