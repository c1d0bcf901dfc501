"""RecycledEncoder: stands in for the frozen part of a model, serving cached activations, computing misses.

With a RecycledEncoder a training loop needs no separate precompute step: the
first epoch computes every sample with the frozen part (and appends it to the
store when ``append=True``), later epochs read the store. It takes the same raw
inputs the full model's caller has — texts (through the model's tokenizer or a
given ``collate``), images, tensors — keys each raw sample by content
(:func:`actstore.key`), and returns what a store's collate gives, so
``head(encoder(texts))`` is the model's output.
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
from actstore.engine.read.ragged import PaddedBatch, RaggedBatch
from actstore.engine.read.snapshot import normalize_keys
from actstore.errors import MissingRowsError, StaleStoreError, StoreError, StoreNotFoundError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.keys import key as content_key
from actstore.models.blocks import Frozen
from actstore.models.capture import train_mode_matters
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.models.split import check_padding
from actstore.store import ActivationStore, create
from actstore.store import open as open_store
from actstore.training.collate import ActivationCollate
from actstore.training.datasets import precompute_config
from actstore.training.worker_parts import WorkerPart, adopt_parts

__all__ = ["RecycledEncoder", "output_rows"]


def _is_padded_pair(value: Any) -> bool:
    if not (isinstance(value, tuple) and len(value) == 2 and not isinstance(value, PaddedBatch)):
        return False
    values, mask = value
    return (isinstance(values, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.ndim == 2
            and values.ndim >= 2 and tuple(mask.shape) == tuple(values.shape[:2]) and not mask.is_floating_point())


def _carries_mask(value: Any) -> bool:
    mask = getattr(value, "attention_mask", None)
    return (isinstance(value, torch.Tensor) and isinstance(mask, torch.Tensor) and value.ndim >= 3
            and tuple(mask.shape) == tuple(value.shape[:2]))


def _rows_of(value: Any, n: int, name: str, ragged: dict[str, bool] | None) -> list[torch.Tensor]:
    flag: bool
    if isinstance(value, PaddedBatch):
        lens = value.lengths.tolist()
        rows, flag = [value.values[i, :ln] for i, ln in enumerate(lens)], True
    elif _is_padded_pair(value):
        padded, mask = value  # the real tokens wherever they are: right or left padding
        rows, flag = [padded[i][mask[i].bool()] for i in range(len(padded))], True
    elif _carries_mask(value):
        mask = value.attention_mask  # split's frozen part: SplitStates with the batch's mask
        plain = value.as_subclass(torch.Tensor)
        rows, flag = [plain[i][mask[i].bool()] for i in range(len(plain))], True
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
    :class:`~actstore.RaggedBatch`, a :class:`PaddedBatch`, a ``(padded, mask)``
    pair or split's :class:`~actstore.models.blocks.SplitStates` (the real tokens
    of each row are kept, on whichever side the padding is).  ``ragged``, if
    given, is filled with whether each field came in a variable-length form.
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
        Sample → 32-byte key (default :func:`actstore.key`), on the raw sample.
    collate_fn
        Raw samples (a list) → what ``frozen`` takes, for the misses only: a
        tokenizer call for texts, for instance.  Default: for split's frozen part
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
        self.key_fn = key_fn or content_key
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
            self._fingerprint = frozen_fingerprint(self.frozen)  # type: ignore[arg-type]
        return self._fingerprint

    def _check_store(self, store: ActivationStore) -> None:
        if (self.check_fingerprint and store.fingerprint is not None and isinstance(self.frozen, nn.Module)
                and not fingerprint_matches(store.fingerprint, self._model_fingerprint(), self.frozen)):
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
            out = self._compute(_select(inputs, first))
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
        batch = self.collate_fn(list(raw) if isinstance(raw, tuple) else raw) if self.collate_fn else raw
        if isinstance(self.frozen, nn.Module):
            if isinstance(batch, Mapping):
                check_padding(self.frozen, batch.get("attention_mask"))
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
        main, attrs, worker = self._store, {"recycled_encoder": {"layers": list(fields)}}, os.getpid() != self._owner
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
