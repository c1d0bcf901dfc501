"""What CachedDataset checks before it serves a row: the key each dataset position would have today.

A store keys its rows one of two ways (the precompute record's ``keys``,
docs/FORMAT.md §14):

- ``"inputs"`` (the default since record version 2): the model inputs as fed.
  :func:`position_keys` collates the dataset's items with the precompute's
  ``collate_fn`` (given, or actstore's default when the record names it) in
  batches, splits the batch per sample and trims it
  (:func:`~actstore.precompute.inputs.input_keys`), exactly as precompute did —
  so a changed tokenizer, truncation, transform or file is a mismatch.
- ``"items"``: ``key_fn`` of the raw input, as precompute's ``key_fn=`` (or a
  version-1 store) keyed it.  Weaker: it does not see preprocessing or a file
  edited under the same path.

:func:`key_check` decides which, from the record and the arguments, and
refuses what cannot be checked safely (a custom collate not given; a
version-1 store under the safe default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.errors import StaleStoreError, UnsupportedCheckError
from actstore.format.keys import DEFAULT_KEY_NAMES
from actstore.format.keys import key as content_key
from actstore.models.blocks import Frozen
from actstore.precompute.augment import AugmentError, AugmentSpec, augmented_keys
from actstore.precompute.inputs import input_keys
from actstore.precompute.items import item_part
from actstore.precompute.loader import DEFAULT_COLLATE_NAMES, default_collate, qualname
from actstore.store import ActivationStore
from actstore.training.datasets import RecordSummary

__all__ = ["CHEAP_ELEMENTS", "KEYS_ATTR", "NO_COLLATE", "KeyCheck", "augmented_position_keys", "cheap_to_key", "key_check",
           "position_keys"]

#: Items collated at a time by the check.
CHECK_BATCH = 1024
#: The attribute a store made by RecycledEncoder records its key scheme in.
KEYS_ATTR = "recycled_encoder"
#: The collate a RecycledEncoder records when its frozen module takes the raw samples as a list.
NO_COLLATE = "none"


def _as_list(xs: Sequence[Any]) -> list[Any]:
    return list(xs)


@dataclass(frozen=True)
class KeyCheck:
    """How to compute a dataset position's key: by ``scheme`` ("inputs" or "items") with these functions."""

    scheme: str
    collate_fn: Callable[[list[Any]], Any] | None = None
    lengths_fn: Callable[[Any], Any] | None = None
    key_fn: Callable[[Any], bytes] = content_key


def store_scheme(store: ActivationStore, cfg: RecordSummary) -> tuple[str, int | None, str | None]:
    """(the store's key scheme, its record version, the recorded collate's name) — a store precompute did not
    write: RecycledEncoder's attribute, else raw items."""
    rec = cfg.record
    if rec is not None:
        return rec.keys, rec.version, rec.collate_fn
    made = store.attrs.get(KEYS_ATTR)
    scheme = made.get("keys", "items") if isinstance(made, dict) else "items"
    collate = made.get("collate_fn") if isinstance(made, dict) else None
    return (scheme if scheme in ("inputs", "items") else "items"), None, collate


def model_collate(model: Any, recorded: str | None) -> Callable[[list[Any]], Any] | None:
    """The collate a frozen part knows (a sentence-transformers model's ``preprocess`` or ``tokenize``), when it is the
    one the record names; else None."""
    root = model.__dict__.get("root") if isinstance(model, Frozen) else model
    for name in ("preprocess", "tokenize"):
        fn = getattr(root, name, None)
        if callable(fn) and recorded is not None and qualname(fn) == recorded:
            return fn  # type: ignore[no-any-return]
    return None


def key_check(store: ActivationStore, cfg: RecordSummary, *, items: bool, collate_fn: Any, lengths_fn: Any,
              key_fn: Any, where: str, model: Any = None) -> KeyCheck:
    """The check for this store and these arguments (``items``: ``check="items"`` was asked).

    Without ``collate_fn``, a recorded collate that is actstore's default, or that
    ``model`` (the frozen part) knows, is used.

    Raises ``ValueError`` for a function the check needs and was not given,
    :class:`StaleStoreError` for a version-1 store under the safe default, and
    :class:`UnsupportedCheckError` for ``check="items"`` over a store keyed by
    inputs (it records no raw item key per position).
    """
    scheme, version, recorded_collate = store_scheme(store, cfg)
    rerun = (f"rerun actstore.precompute(model, dataset, {store.path!r}, collate_fn=...) with today's pipeline (it "
             "recomputes only the rows whose inputs changed)")
    if scheme == "inputs":
        if items:
            raise UnsupportedCheckError(
                f"{where}: check='items' compares raw item keys, but this store keys rows by the model inputs and "
                "records no raw item key per dataset position; pass collate_fn= (the collate precompute used) for "
                "the full check")
        if key_fn is not None:
            raise ValueError(f"{where}: key_fn= applies to stores keyed by raw items; this store keys rows by the "
                             "model inputs as fed: pass collate_fn= (the collate precompute used) instead")
        if collate_fn is None and recorded_collate == NO_COLLATE:
            collate_fn = _as_list  # the frozen module took the raw samples: they are its inputs
        if collate_fn is None and model is not None:
            collate_fn = model_collate(model, recorded_collate)
        if collate_fn is None:
            if recorded_collate not in DEFAULT_COLLATE_NAMES:
                raise ValueError(
                    f"{where}: the store keys rows by the model inputs, which precompute made with collate_fn "
                    f"{recorded_collate}; pass the same collate as collate_fn= so that every served row is checked "
                    "against today's inputs, or check='items' for the weaker check of raw item keys (it does not "
                    "catch preprocessing or file changes)")
            collate_fn = default_collate
        recorded_lengths = cfg.record.lengths_fn if cfg.record is not None else None
        if recorded_lengths is not None and lengths_fn is None:
            raise ValueError(f"{where}: precompute trimmed the inputs' keys with lengths_fn {recorded_lengths}; "
                             "pass the same function as lengths_fn=")
        return KeyCheck("inputs", collate_fn, lengths_fn)
    recorded_key = cfg.key_fn
    if version == 1 and recorded_key in DEFAULT_KEY_NAMES and not items:
        raise StaleStoreError(
            f"{where}: the store predates input keys (precompute record version 1: rows keyed by the raw items, so "
            f"a changed tokenizer, truncation, transform or file would go unnoticed); {rerun}, or pass "
            "check='items' to serve it with the weaker check of raw item keys")
    if key_fn is None and recorded_key not in DEFAULT_KEY_NAMES:
        raise ValueError(f"{where}: precompute keyed the inputs with {recorded_key}; pass the same function as key_fn=")
    return KeyCheck("items", key_fn=key_fn or content_key)


def position_keys(dataset: Any, positions: Sequence[int] | np.ndarray, part: Any, check: KeyCheck, where: str,
                  first_type: type | None = None) -> np.ndarray:
    """The key of ``dataset[p]``'s input part for each position, as ``check`` says: an ``(n, 32)`` uint8 array.

    Reads each item once; items must all be of ``first_type`` (when given).
    Raises ``ValueError`` naming a position whose item has another type, and
    re-raises a collate's error (a file that vanished) naming the position.
    """
    out = np.empty((len(positions), 32), np.uint8)
    for a in range(0, len(positions), CHECK_BATCH):
        chunk = [int(p) for p in positions[a: a + CHECK_BATCH]]
        xs = []
        for p in chunk:
            item = dataset[p]
            if first_type is not None and type(item) is not first_type:
                raise ValueError(f"{where}: dataset[{p}] is a {type(item).__name__}, but dataset[{int(positions[0])}] "
                                 f"is a {first_type.__name__}: items must all have one type")
            xs.append(item_part(item, part))
        if check.scheme == "items":
            for j, x in enumerate(xs):
                k = check.key_fn(x)
                if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != 32:
                    raise TypeError(f"key_fn must return 32 bytes (like actstore.key), got {type(k).__name__}")
                out[a + j] = np.frombuffer(bytes(k), np.uint8)
            continue
        collate = check.collate_fn or default_collate
        try:
            batch = collate(xs)
        except Exception as e:
            raise _culprit(collate, xs, chunk, e, where) from e
        out[a: a + len(xs)] = input_keys(batch, len(xs), lengths_fn=check.lengths_fn, raw=xs)
    return out


def augmented_position_keys(dataset: Any, positions: Sequence[int] | np.ndarray, part: Any, check: KeyCheck,
                            spec: AugmentSpec, where: str) -> np.ndarray:
    """The keys of the ``spec.count`` augmentations of ``dataset[p]``'s input for each position, made and keyed as
    precompute made them (:mod:`actstore.precompute.augment`): an ``(n, K, 32)`` uint8 array.

    Reads each item once.  Raises ``ValueError``/``TypeError`` naming the item and augmentation an augment fails on.
    """
    k = spec.count
    out = np.empty((len(positions), k, 32), np.uint8)
    collate = check.collate_fn or default_collate
    for a in range(0, len(positions), CHECK_BATCH):
        chunk = [int(p) for p in positions[a: a + CHECK_BATCH]]
        xs = [item_part(dataset[p], part) for p in chunk]
        try:
            content, _ = spec.apply(xs, chunk, [0] * len(xs), collate, check.lengths_fn)
            for v in range(k):
                ys = [spec.one(x, content[j], v, chunk[j], j) for j, x in enumerate(xs)]
                own = input_keys(collate(ys), len(ys), lengths_fn=check.lengths_fn, raw=ys)
                out[a: a + len(xs), v] = augmented_keys(content, [v] * len(ys), own)
        except AugmentError as e:
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where}: {e}") from e
    return out


def _culprit(collate: Callable[[list[Any]], Any], xs: list[Any], positions: list[int], error: Exception,
             where: str) -> Exception:
    """The error of the first item the collate refuses alone (naming its position), else the batch's."""
    for x, p in zip(xs, positions, strict=True):
        try:
            collate([x])
        except Exception as e:
            kind = type(e) if isinstance(e, (OSError, TypeError, ValueError, KeyError)) else RuntimeError
            try:
                return kind(f"{where}: dataset[{p}]: collate_fn failed: {e}")
            except TypeError:  # an exception type with another signature
                return RuntimeError(f"{where}: dataset[{p}]: collate_fn failed: {e!r}")
    return RuntimeError(f"{where}: collate_fn failed on dataset[{positions[0]}:{positions[-1] + 1}]: {error!r}")


#: Elements of an array input that still count as cheap to key at construction.
CHEAP_ELEMENTS = 4096


def cheap_to_key(x: Any) -> bool:
    """Whether keying every item like ``x`` at construction is cheap (about a second per million short strings)."""
    if isinstance(x, (str, bytes, bytearray, int, float, bool, np.number)):
        return True
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return int(np.prod(x.shape)) <= CHEAP_ELEMENTS
    if isinstance(x, Mapping):
        return all(cheap_to_key(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return len(x) <= CHEAP_ELEMENTS and all(isinstance(v, (int, float, bool, str)) for v in x)
    return False
