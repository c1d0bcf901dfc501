"""Dataset items: the model input, its content key, and the side columns stored beside it.

:class:`Selector` splits a raw item into the model input and its side columns
(labels, ids); :class:`Prepare` does that for a whole DataLoader batch inside
the DataLoader workers, computes the content keys there and, optionally,
collates the inputs; :class:`SideColumns` turns side values into store fields.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from blake3 import blake3

from actstore.engine.keyset import KeySet
from actstore.engine.ragged import RaggedBatch
from actstore.format.manifest import Field
from actstore.hashing import key as content_key

__all__ = [
    "DEFAULT_INPUT_KEYS",
    "NOT_FOUND",
    "Group",
    "IterableWrapper",
    "KeyTable",
    "Prepare",
    "Selector",
    "SideColumn",
    "SideColumns",
    "default_collate",
    "field_name",
    "qualname",
    "row_digests",
    "side_kind",
    "to_device",
]

#: Dict keys tried, in order, for the model input of a dict item when ``input=`` is not given.
DEFAULT_INPUT_KEYS = ("input", "inputs", "text", "image", "x")


# --- items: input part and side columns --------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Where the model input sits in a dataset item.

    ``input=None`` (the default): a tuple item's element 0; a dict item's first
    key among :data:`DEFAULT_INPUT_KEYS`; anything else (a str, tensor, list,
    PIL image ...) is the input itself.  An int picks a tuple element, a str a
    dict key.  Everything else in a tuple or dict is a side column, named by its
    position (``"1"``, ``"2"`` ...) or its key.
    """

    input: int | str | None = None

    def split(self, item: Any) -> tuple[Any, dict[str, Any] | None]:
        """(model input, side values by column name); side is None for a bare item."""
        if isinstance(item, tuple):
            i = 0 if self.input is None else self.input
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"input={self.input!r} selects a dict key, but the item is a tuple; pass input=<int>")
            if not -len(item) <= i < len(item):
                raise IndexError(f"input={i} is out of range for a tuple item of {len(item)} elements")
            i %= len(item)
            return item[i], {str(j): v for j, v in enumerate(item) if j != i}
        if isinstance(item, Mapping):
            name = self.input
            if name is None:
                name = next((k for k in DEFAULT_INPUT_KEYS if k in item), None)
                if name is None:
                    raise KeyError(
                        f"cannot tell which key of a dict item is the model input (keys: {sorted(map(str, item))}); "
                        f"pass input='<key>' (default keys tried: {', '.join(DEFAULT_INPUT_KEYS)})"
                    )
            elif not isinstance(name, str):
                raise TypeError(f"input={name!r} selects a tuple element, but the item is a dict; pass input='<key>'")
            if name not in item:
                raise KeyError(f"input={name!r}: the item has no such key (keys: {sorted(map(str, item))})")
            return item[name], {str(k): v for k, v in item.items() if k != name}
        if self.input is not None:
            raise TypeError(f"input={self.input!r} given, but the item is a {type(item).__name__}, not a tuple or dict")
        return item, None

    def structure(self, item: Any) -> dict[str, Any]:
        """The item's shape as recorded in the store's attrs (see :func:`actstore.precompute`)."""
        if isinstance(item, tuple):
            i = (0 if self.input is None else int(self.input)) % len(item)
            return {"type": "tuple", "length": len(item), "input": i}
        if isinstance(item, Mapping):
            name = self.input if self.input is not None else next(k for k in DEFAULT_INPUT_KEYS if k in item)
            return {"type": "dict", "keys": [str(k) for k in item], "input": name}
        return {"type": "bare"}


@dataclass
class Group:
    """One DataLoader batch after :class:`Prepare`: keys, inputs, side values, maybe collated."""

    keys: np.ndarray  # (n, 32) uint8
    inputs: list[Any] | None  # raw model inputs; None when `collated` covers them (refetch if needed)
    sides: list[dict[str, Any] | None]
    structure: dict[str, Any] | None  # of the first item (Selector.structure), recorded in the store's attrs
    collated: Any = None
    error: tuple[int, BaseException] | None = None  # (offset in the batch, exception)
    collate_error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.sides)

    def pin_memory(self) -> Group:  # called by DataLoader(pin_memory=True)
        if self.collated is not None:
            from torch.utils.data._utils.pin_memory import pin_memory

            self.collated = pin_memory(self.collated)
        return self


class Prepare:
    """The DataLoader ``collate_fn``: split items, key the inputs, collate speculatively.

    Runs in the DataLoader workers (or the main thread with ``num_workers=0``).
    Errors are caught and returned in the :class:`Group` with the item's offset,
    so that the main thread can name the dataset index.
    """

    def __init__(self, selector: Selector, key_fn: Callable[[Any], bytes] | None, collate_fn: Callable[[list[Any]], Any],
                 speculative: bool, keep_inputs: bool) -> None:
        self.selector = selector
        self.key_fn = key_fn
        self.collate_fn = collate_fn
        self.speculative = speculative
        self.keep_inputs = keep_inputs

    def __call__(self, items: Sequence[Any]) -> Group:
        inputs: list[Any] = []
        sides: list[dict[str, Any] | None] = []
        buf = bytearray()
        for j, item in enumerate(items):
            try:
                x, side = self.selector.split(item)
                k = content_key(x) if self.key_fn is None else check_key(self.key_fn(x))
            except Exception as e:  # reported with its dataset index by the main thread
                return Group(np.empty((0, 32), np.uint8), None, [], None, error=(j, e))
            inputs.append(x)
            sides.append(side)
            buf += k
        keys = np.frombuffer(bytes(buf), np.uint8).reshape(-1, 32)
        group = Group(keys, inputs, sides, self.selector.structure(items[0]) if len(items) else None)
        if self.speculative:
            try:
                group.collated = self.collate_fn(inputs)
            except Exception as e:  # the main thread collates again and raises there
                group.collate_error = e
            if group.collated is not None and not self.keep_inputs:
                group.inputs = None
        return group


def check_key(k: Any) -> bytes:
    if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != 32:
        raise TypeError(f"key_fn must return 32 bytes (like actstore.key), got {type(k).__name__} "
                        f"of length {len(k) if hasattr(k, '__len__') else '?'}")
    return bytes(k)


# --- side columns -------------------------------------------------------------------

_FLOATS = {np.dtype("float64"): "float32", np.dtype("float32"): "float32", np.dtype("float16"): "float16"}
_INTS = {np.dtype(t): t for t in ("int8", "int16", "int32", "int64", "uint8", "bool")}


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def side_kind(name: str, value: Any) -> tuple[str, Field]:
    """The kind and field of a side value: scalars → shape (), arrays → their shape, str/bytes → ragged uint8."""
    if isinstance(value, (bool, np.bool_)):
        return "bool", Field((), "bool")
    if isinstance(value, (int, np.integer)):
        return "int", Field((), "int64")
    if isinstance(value, (float, np.floating)):
        return "float", Field((), "float32")
    if isinstance(value, str):
        return "str", Field((None,), "uint8")
    if isinstance(value, (bytes, bytearray)):
        return "bytes", Field((None,), "uint8")
    if isinstance(value, (np.ndarray, torch.Tensor, list, tuple)):
        arr = _array(value)
        dtype = _FLOATS.get(arr.dtype) or _INTS.get(arr.dtype)
        if dtype is None:
            raise TypeError(f"side column {name!r}: cannot store an array of {arr.dtype}; convert it, or drop the "
                            f"column with side_fields={{{name!r}: None}}")
        kind = "tensor" if isinstance(value, torch.Tensor) else "array"
        return kind, Field(arr.shape, dtype)
    raise TypeError(
        f"side column {name!r}: cannot store a {type(value).__name__} (store bool, int, float, str, bytes, arrays or "
        f"tensors); drop it with side_fields={{{name!r}: None}} or pick the input with input=..."
    )


@dataclass
class SideColumn:
    name: str  # the tuple position or dict key
    field: str  # the store field
    kind: str
    spec: Field

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "field": self.field, "kind": self.kind}


class SideColumns:
    """Converts per-item side values into store columns (fixed arrays or ragged batches)."""

    def __init__(self, columns: list[SideColumn]) -> None:
        self.columns = columns

    def convert(self, sides: list[dict[str, Any] | None], positions: Sequence[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.columns:
            values = [s[c.name] if s is not None and c.name in s else _MISSING for s in sides]
            for v, p in zip(values, positions, strict=True):
                if v is _MISSING:
                    raise ValueError(f"dataset[{p}]: side column {c.name!r} is missing (the first item had it)")
            if c.kind in ("str", "bytes"):
                parts = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v)  # type: ignore[arg-type]
                         for v in values]
                offsets = np.zeros(len(parts) + 1, np.int64)
                np.cumsum([len(b) for b in parts], out=offsets[1:])
                flat = np.frombuffer(b"".join(parts), np.uint8)
                out[c.field] = RaggedBatch(torch.from_numpy(flat.copy()), torch.from_numpy(offsets))
                continue
            if c.spec.ragged:
                out[c.field] = [_array(v) for v in values]
                continue
            arrays = [_array(v) for v in values]
            for a, p in zip(arrays, positions, strict=True):
                if a.shape != c.spec.shape:
                    raise ValueError(f"dataset[{p}]: side column {c.name!r} has shape {a.shape}, but earlier items "
                                     f"have {c.spec.shape}; give a ragged Field in side_fields= for variable shapes")
            stacked = np.stack(arrays) if arrays else np.empty((0, *c.spec.inner_shape))
            out[c.field] = stacked.astype(c.spec.spec.numpy, copy=False)
        return out


class _Missing:
    pass


_MISSING = _Missing()


def row_digests(columns: dict[str, Any], fields: Sequence[str], n: int) -> np.ndarray:
    """An 8-byte digest per row of the stored form of ``fields`` (to spot conflicting duplicates)."""
    hashers = [blake3() for _ in range(n)]
    for name in fields:
        col = columns[name]
        if isinstance(col, RaggedBatch):
            vals = col.values.numpy()
            off = col.offsets.numpy()
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(vals[off[i]:off[i + 1]]).tobytes() + b"|")
        elif isinstance(col, list):
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(col[i]).tobytes() + b"|")
        else:
            arr = col.numpy() if isinstance(col, torch.Tensor) else col
            for i in range(n):
                hashers[i].update(np.ascontiguousarray(arr[i]).tobytes() + b"|")
    return np.array([int.from_bytes(h.digest(8), "little") for h in hashers], np.uint64)


def field_name(layer: str) -> str:
    """The store field of a layer: ``""`` → ``"output"``, other characters than ``[A-Za-z0-9_.-]`` → ``_``."""
    if layer == "":
        return "output"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
    if name[0] in ".-":
        name = "_" + name
    while name.startswith("__"):
        name = name[1:]
    if name.lower() == "zarr.json":
        name += "_"
    return name[:128]


# --- keys scheduled during this run ---------------------------------------------------


class KeyTable:
    """A set of keys with one int64 code and one uint64 digest each (a :class:`~actstore.engine.keyset.KeySet`
    plus both, in insertion order): about 50 bytes a key."""

    def __init__(self) -> None:
        self._set = KeySet()
        self._codes = np.empty(0, np.int64)
        self._digests = np.empty(0, np.uint64)

    def __len__(self) -> int:
        return len(self._set)

    def add(self, keys: np.ndarray, codes: np.ndarray, digests: np.ndarray | None = None) -> None:
        """Add ``keys`` (distinct, not in the table yet) with their codes (and digests)."""
        m = len(keys)
        if not m:
            return
        n = len(self._set)
        self._set.add(keys)
        if n + m > len(self._codes):
            cap = max(2 * len(self._codes), n + m, 1024)
            self._codes = np.concatenate([self._codes[:n], np.empty(cap - n, np.int64)])
            self._digests = np.concatenate([self._digests[:n], np.empty(cap - n, np.uint64)])
        self._codes[n : n + m] = codes
        self._digests[n : n + m] = 0 if digests is None else digests

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(code, digest) of each key; code is ``NOT_FOUND`` for absent keys."""
        idx = self._set.find(keys)
        hit = idx >= 0
        code = np.full(len(keys), NOT_FOUND, np.int64)
        digest = np.zeros(len(keys), np.uint64)
        code[hit] = self._codes[idx[hit]]
        digest[hit] = self._digests[idx[hit]]
        return code, digest


NOT_FOUND = np.iinfo(np.int64).min


# --- batches -------------------------------------------------------------------------


def qualname(obj: Any) -> str | None:
    if obj is None:
        return None
    t = obj if isinstance(obj, type) else type(obj)
    if callable(obj) and hasattr(obj, "__qualname__") and not isinstance(obj, type):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"{t.__module__}.{t.__qualname__}"


class IterableWrapper(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)


def default_collate(inputs: list[Any]) -> Any:
    if inputs and isinstance(inputs[0], str):
        raise TypeError("the model inputs are str: pass collate_fn= (for example a tokenizer call) to turn a list of "
                        "them into tensors")
    return torch.utils.data.default_collate(inputs)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is not dict:
            with contextlib.suppress(Exception):  # keep a BatchEncoding a BatchEncoding
                return type(batch)(moved)  # type: ignore[call-arg]
        return moved
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch
