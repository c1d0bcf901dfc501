"""RecycledEncoder: stands in for the frozen part of a model, serving cached activations, computing misses.

With a RecycledEncoder a training loop needs no separate precompute step: the
first epoch computes every sample with the frozen part (and appends it to the
store when ``append=True``), later epochs read the store. It takes the same raw
inputs the full model's caller has — texts (through the model's tokenizer or a
given ``collate``), images, tensors — collates the whole call's samples, keys
each sample by its model input as fed (the same input keys as
:func:`actstore.precompute`: :mod:`actstore.precompute.inputs`), and returns
what a store's collate gives, so ``head(encoder(texts))`` is the model's
output.  A store filled by precompute serves the encoder, and the reverse.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.deprecation import renamed_arguments
from actstore.engine.read.gather import row_view
from actstore.engine.read.snapshot import normalize_keys
from actstore.errors import MissingRowsError, StaleStoreError, StoreError, StoreNotFoundError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.models.blocks import Frozen
from actstore.models.capture import train_mode_matters
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.models.split import check_batch
from actstore.precompute.inputs import input_keys
from actstore.precompute.loader import qualname
from actstore.store import ActivationStore, create
from actstore.store import open as open_store
from actstore.training.checks import KEYS_ATTR, NO_COLLATE, store_scheme
from actstore.training.collate import ActivationCollate
from actstore.training.datasets import precompute_config
from actstore.training.outputs import output_rows
from actstore.training.worker_parts import WorkerPart, adopt_parts

__all__ = ["RecycledEncoder", "output_rows"]


def _select(inputs: Any, idx: list[int], constants: bool = False) -> Any:
    """Samples ``idx`` of a batch (batch-first tensors, dicts and tuples of them, a list of samples).  Copies.

    ``constants``: a dict's non-tensor values are batch-level constants, kept as they are.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.as_tensor(idx, dtype=torch.long, device=inputs.device)]
    if isinstance(inputs, Mapping):
        picked = {k: v if constants and not isinstance(v, (torch.Tensor, np.ndarray)) else _select(v, idx, constants)
                  for k, v in inputs.items()}
        return picked
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    if constants and isinstance(inputs, (tuple, list)) and inputs and all(
            isinstance(v, (torch.Tensor, np.ndarray)) for v in inputs):
        return type(inputs)(_select(v, idx) for v in inputs) if type(inputs) in (tuple, list) else \
            tuple(_select(v, idx) for v in inputs)
    return [inputs[i] for i in idx]


def _count(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        first = next(iter(inputs.values()), None)
        return 0 if first is None else len(first)
    return len(inputs)


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


# -- the encoder -----------------------------------------------------------------------------

class RecycledEncoder(nn.Module):
    """Stands in for the frozen part of a model: cached activations from the store, misses computed.

    Parameters
    ----------
    frozen
        The frozen part: ``split(model, at)[0]``, or any module.  Called (under
        ``torch.no_grad()``) on the sub-batch of inputs whose keys are not in the
        store, after ``collate``; it returns what :func:`output_rows` accepts —
        split's frozen part returns states carrying their mask, so padding is not
        stored.  It is run in ``eval()`` mode (dropout would make computed rows
        differ from stored ones); one in train mode is switched with a warning.
    store
        An :class:`~actstore.ActivationStore` or a path.  With ``append=True`` a
        path that holds no store yet is created on the first miss, with fields
        inferred from the frozen module's output and its
        :func:`~actstore.fingerprint` recorded.
    key_fn
        Key rows by ``key_fn(raw sample)`` (32 bytes) instead of by the model
        input as fed.  Weaker: a raw key does not see what ``collate_fn`` makes
        of a sample (another tokenizer, truncation, transform), so a store made
        with another preprocessing is served without a word.  Default: input
        keys — every call collates all its samples (the collate is cheap next
        to the frozen part), splits the batch per sample, trims it to each
        sample's tokens and keys that, as :func:`actstore.precompute` does.
    collate_fn
        Raw samples (a list) → what ``frozen`` takes: a tokenizer call for
        texts, for instance.  Every call's samples are collated (their keys
        need it); the misses are computed from their part of that batch.  Default: for split's frozen part
        of a sentence-transformers model, the model's own ``tokenize``; for split's
        frozen part of another model, ``torch.stack`` of tensor samples (texts
        need ``collate_fn``); for any other module, none (it gets the raw list).
        Causal decoders must be padded on the right (a left-padded batch raises
        :class:`~actstore.errors.LeftPaddingError`).
    append
        Append computed rows to the store (needs a writable store: a path, or one
        opened with ``mode="a"``).  Rows are committed every ``commit_every_rows`` rows
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
        Refuse a store whose recorded fingerprint is not ``frozen``'s
        (:func:`actstore.models.fingerprint.frozen_fingerprint`: the frozen part
        only, so training the head keeps the store fresh) with
        :class:`~actstore.StaleStoreError`.  Default ``True``; stores written
        before record the whole model's fingerprint, accepted when it matches
        the model split's frozen part was cut from.

    ``forward(inputs=None, *, keys=None)`` returns, per field, a tensor
    ``(n, *shape)`` (fixed fields) or a :class:`PaddedBatch` (ragged), a dict
    when there are several fields.  Always copies (into the batch).  Only keys
    are needed when every key is stored; a miss without inputs raises
    :class:`MissingRowsError`.  ``.hits``, ``.misses`` (samples computed) and
    ``.hit_rate`` count since construction or :meth:`reset_stats`.

    Examples
    --------
    >>> frozen, head = actstore.split(model, 0.5)  # doctest: +SKIP
    >>> enc = RecycledEncoder(frozen, "cache.store", append=True, collate_fn=tokenize)  # doctest: +SKIP
    >>> for epoch in range(3):  # doctest: +SKIP
    ...     for texts, labels in loader:
    ...         loss = loss_fn(head(enc(texts)), labels)  # a PaddedBatch: the head reads its mask
    >>> enc.close(); enc.hit_rate  # doctest: +SKIP
    """

    @renamed_arguments(collate="collate_fn", commit_every="commit_every_rows")
    def __init__(self, frozen: Callable[..., Any], store: ActivationStore | str | os.PathLike[str],
                 key_fn: Callable[[Any], bytes] | None = None, append: bool = False, *,
                 fields: Sequence[str] | Mapping[str, Field] | str | None = None, store_dtype: Any = None,
                 dtype: torch.dtype | None = None, pad_to_multiple_of: int | None = None, commit_every_rows: int = 4096,
                 device: torch.device | str | None = None, check_fingerprint: bool = True,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        super().__init__()
        self.frozen = frozen
        if isinstance(frozen, nn.Module):
            if train_mode_matters(frozen):
                warnings.warn(f"RecycledEncoder runs the frozen {type(frozen).__name__} in eval mode (no dropout in "
                              "computed or stored rows); it was in train mode", stacklevel=2)
            frozen.eval()
        self.collate_fn = collate_fn if collate_fn is not None else _default_collate(frozen)
        self.key_fn = key_fn  # None: input keys
        self.key_scheme = "items" if key_fn is not None else "inputs"
        self.append = bool(append)
        self.commit_every_rows = int(commit_every_rows)
        self.collate = ActivationCollate(dtype, pad_to_multiple_of)
        self.store_dtype = None if store_dtype is None else dtype_name(store_dtype)
        self.check_fingerprint = check_fingerprint
        self._device = torch.device(device) if device is not None else None
        self._pending: dict[bytes, dict[str, torch.Tensor]] = {}
        self._fingerprint: str | None = None
        self._create_fields = dict(fields) if isinstance(fields, Mapping) else None
        self._owner = os.getpid()  # the process that may write to the store; workers write parts (worker_parts.py)
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
            self._check_scheme(self._store)
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
        self._part = WorkerPart(self.path)
        if self.append:
            self._adopt_parts()  # rows a run's workers computed and nobody adopted

    # -- statistics -----------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        """Hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset_stats(self) -> None:
        """Set the hit and miss counters (``hits``, ``misses``, and so ``hit_rate``) back to zero."""
        self.hits = self.misses = 0

    @property
    def store(self) -> ActivationStore | None:
        """The store (None until a store created here receives its first rows)."""
        return self._store

    def extra_repr(self) -> str:
        """The store, ``append`` and the counters, for ``repr(encoder)``."""
        return f"store={self.path!r}, append={self.append}, hits={self.hits}, misses={self.misses}"

    def train(self, mode: bool = True) -> RecycledEncoder:
        """``nn.Module.train``, except that the frozen part stays in eval mode; returns self."""
        super().train(mode)
        if isinstance(self.frozen, nn.Module):
            self.frozen.eval()  # the frozen part never trains
        return self

    def _model_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = frozen_fingerprint(self.frozen)  # type: ignore[arg-type]
        return self._fingerprint

    def _check_store(self, store: ActivationStore) -> None:
        if (self.check_fingerprint and store.fingerprint is not None and isinstance(self.frozen, nn.Module)
                and not fingerprint_matches(store.fingerprint, self._model_fingerprint(), self.frozen)):
            raise StaleStoreError(
                f"{store.path}: the store was computed by another model ({store.fingerprint[:16]}…, this frozen "
                f"module is {self._model_fingerprint()[:16]}…); use a new path, or pass check_fingerprint=False"
            )

    def _check_scheme(self, store: ActivationStore) -> None:
        """Refuse a store keyed another way than this encoder keys (raw items vs the inputs as fed), where the two
        differ (a collate stands between them)."""
        cfg = precompute_config(store)
        if store.attrs.get(KEYS_ATTR) is None and cfg.record is None:
            return  # a store of the user's own: keys as the user made them
        have, _, _ = store_scheme(store, cfg)
        if have != self.key_scheme and self.collate_fn is not None:
            fix = ("pass key_fn=actstore.key to look it up by raw samples (weaker: preprocessing changes go "
                   "unnoticed), or rerun precompute on it (it recomputes every row under input keys)") \
                if have == "items" else "leave key_fn= out (rows are then keyed by the model inputs as fed)"
            raise StoreError(f"{store.path}: the store keys rows by {'raw items' if have == 'items' else 'model inputs'}"
                             f", this encoder by {'raw samples (key_fn=)' if self.key_fn else 'model inputs'}; {fix}")

    # -- the work ------------------------------------------------------------------------------
    def _keys(self, inputs: Any, keys: Any) -> tuple[np.ndarray, Any]:
        """(the keys of the call's samples, the collated batch or None)."""
        if keys is not None:
            return normalize_keys(list(keys) if isinstance(keys, tuple) else keys), None
        if inputs is None:
            raise TypeError("RecycledEncoder: pass the batch of inputs, or keys=")
        if self.key_fn is not None:
            return normalize_keys([self.key_fn(s) for s in _samples(inputs)]), None
        raw = list(inputs) if isinstance(inputs, tuple) else inputs
        batch = self.collate_fn(raw) if self.collate_fn else raw
        return input_keys(batch, _count(raw), raw=raw if isinstance(raw, list) else None), batch

    def _resolve(self, inputs: Any, keys: Any) -> tuple[np.ndarray, dict[str, dict[int, torch.Tensor]]]:
        """Rows of stored keys (-1 elsewhere) and the rows served from memory or computed, per field."""
        karr, batch = self._keys(inputs, keys)
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
            # Input keys: the misses' part of the batch that was keyed; raw keys: collate the misses.
            out = self._run(_select(batch, first, constants=True)) if batch is not None else \
                self._compute(_select(inputs, first))
            produced = output_rows(out, self.names, len(first), ragged)
            for j, ps in enumerate(todo.values()):
                for name in self.names:
                    for p in ps:
                        extra[name][p] = produced[name][j]
            if self.append:
                self._append(karr[first], produced, ragged)
        return rows, extra

    def _compute(self, raw: Any) -> Any:
        """Run the frozen part on raw samples (collated first)."""
        return self._run(self.collate_fn(list(raw) if isinstance(raw, tuple) else raw) if self.collate_fn else raw)

    def _run(self, batch: Any) -> Any:
        """Run the frozen part on a collated batch."""
        if isinstance(self.frozen, nn.Module):
            check_batch(self.frozen, batch)  # left padding; position ids a store cannot give back to the head
            batch = _to_device(batch, _module_device(self.frozen))
        if isinstance(self.frozen, nn.Module):
            self.frozen.eval()
        with torch.no_grad():
            return self.frozen(batch)

    def _append(self, karr: np.ndarray, produced: dict[str, list[torch.Tensor]], ragged: dict[str, bool]) -> None:
        fields = self._store.fields if self._store is not None else self._create_fields or {
            name: Field(((None,) + tuple(rows[0].shape[1:])) if ragged[name] else tuple(rows[0].shape),
                        self.store_dtype or dtype_name(rows[0].dtype))
            for name, rows in produced.items()
        }
        values = {name: rows if fields[name].ragged else torch.stack(rows) for name, rows in produced.items()}
        fp = self._model_fingerprint() if isinstance(self.frozen, nn.Module) else None
        made = {"layers": list(fields), "keys": self.key_scheme,
                "collate_fn": qualname(self.collate_fn) if self.collate_fn is not None else NO_COLLATE}
        main, attrs, worker = self._store, {KEYS_ATTR: made}, os.getpid() != self._owner
        if worker:  # a DataLoader worker: into its own part, which the owner adopts (worker_parts.py)
            if self._part.append(karr, values, fields, main.fingerprint if main else fp, main.attrs if main else attrs,
                                 self.commit_every_rows):
                self._pending.clear()  # committed to the part (a key met again is computed again, stored once)
        else:
            if main is None:
                main = self._store = create(self.path, dict(fields), fingerprint=fp, exist_ok=True, attrs=attrs)
            main.append(karr, values)
        for i, k in enumerate(karr):
            self._pending[bytes(k)] = {name: produced[name][i] for name in self.names}
        if not worker and main is not None and main.pending >= self.commit_every_rows:
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
        snap = self._store.snapshot if self._store is not None else None
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
        snap = self._store.snapshot if self._store is not None else None
        for p, r in enumerate(rows.tolist()):
            loc = snap.locate(r) if r >= 0 and snap is not None else None
            for name in names:
                out[name].append(row_view(loc[0], loc[1], name, self._store.fields[name]) if loc  # type: ignore[union-attr]
                                 else extra[name][p])
        return out

    def commit(self) -> int | None:
        """Commit appended rows and adopt finished DataLoader workers' parts (a worker commits its part)."""
        if os.getpid() != self._owner:
            self._pending.clear()
            return self._part.commit()
        if self._store is not None and self._store.mode == "a":
            self._store.commit()
        self._adopt_parts()
        self._pending.clear()
        return self._store.generation if self._store is not None and self._store.mode == "a" else None

    def _adopt_parts(self) -> None:
        if self.append and (self._store is None or self._store.mode == "a"):
            self._store = adopt_parts(self.path, self._store)

    def close(self) -> None:
        """Commit appended rows (adopting the workers' parts) and close the store (idempotent)."""
        if os.getpid() != self._owner:
            self._part.close()
        elif self.append:
            self.commit()
        if self._store is not None:
            self._store.close()

    def __getstate__(self) -> dict[str, Any]:  # (spawned workers: a writable store travels as its path)
        state = {**super().__getstate__(), "_pending": {}, "_part": WorkerPart(self.path)}
        if self._store is not None and self._store.mode == "a":
            state["_store"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._store is None and os.path.exists(os.path.join(self.path, "zarr.json")):
            self._store = open_store(self.path)

    def __enter__(self) -> RecycledEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _module_device(module: Any) -> torch.device | None:
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return None


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _stack(samples: Any) -> Any:
    """Tensor samples → one batch; anything else must come with a collate."""
    if isinstance(samples, (torch.Tensor, Mapping)):
        return samples
    items = list(samples)
    if items and all(isinstance(x, torch.Tensor) for x in items):
        return torch.stack(items)
    if items and all(isinstance(x, np.ndarray) for x in items):
        return torch.from_numpy(np.stack(items))
    kinds = sorted({type(x).__name__ for x in items})
    raise TypeError(
        f"RecycledEncoder: the frozen part takes model inputs, but the samples are {kinds}; pass collate_fn= "
        "(for texts, the model's tokenizer: collate_fn=lambda texts: tokenizer(texts, padding=True, "
        "return_tensors='pt'))"
    )


def _default_collate(frozen: Any) -> Callable[[Any], Any] | None:
    if not isinstance(frozen, Frozen):
        return None  # a module of the user's: it takes the raw samples
    root = frozen.__dict__.get("root")
    for name in ("preprocess", "tokenize"):  # sentence-transformers: the model's own tokenizer
        fn = getattr(root, name, None)
        if callable(fn) and hasattr(root, "encode"):
            return _texts_through(fn)
    return _stack


def _texts_through(tokenize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def collate(samples: Any) -> Any:
        items = list(samples) if not isinstance(samples, (torch.Tensor, Mapping)) else samples
        if isinstance(items, list) and all(isinstance(x, str) for x in items):
            return dict(tokenize(items))
        return _stack(items)

    return collate
