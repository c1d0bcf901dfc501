"""Dataset items, both ways: :func:`encode_item` splits an item for precompute, :func:`decode_item` rebuilds it.

The mirrored pair behind ``attrs["precompute"]["sample"]`` (an
:class:`~actstore.format.record.ItemRecord`): precompute calls
:func:`encode_item` on every raw item (model input + side values) and records
the layout and each side column's kind; :class:`~actstore.CachedDataset` reads
that record and calls :func:`decode_item` to give back items of the same
structure, the input replaced by its activations.  Side values go the same way:
:func:`encode_side` (kind and field of a value; :class:`SideColumns` for a
batch of them) and :func:`decode_side`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.write.validate import field_of
from actstore.errors import DatasetMismatchError
from actstore.format.fields import Field
from actstore.format.record import ItemRecord
from actstore.storage.scratch import ScratchArray

__all__ = [
    "DEFAULT_INPUT_KEYS",
    "NOT_MODEL_INPUTS",
    "ItemLayout",
    "PositionSides",
    "Selector",
    "SideColumn",
    "SideColumns",
    "decode_item",
    "decode_side",
    "encode_item",
    "encode_side",
    "infer_input",
    "item_part",
    "item_layout",
    "model_input",
    "model_input_keys",
    "side_kind",
    "value_kind",
]

#: Dict keys tried, in order, for the model input of a dict item when ``input=`` is not given.
DEFAULT_INPUT_KEYS = ("input", "inputs", "text", "image", "x")
#: Arguments of a model's ``forward`` that are never taken from an item as model input (they are side columns).
NOT_MODEL_INPUTS = frozenset({"labels", "label", "return_dict", "return_loss", "output_attentions",
                              "output_hidden_states", "use_cache", "self"})


def model_input_keys(item: Mapping[Any, Any], model_args: frozenset[str] | None) -> tuple[str, ...]:
    """The keys of a dict item that are arguments of the model's ``forward`` (in item order), or ``()``."""
    if not model_args:
        return ()
    return tuple(k for k in item if isinstance(k, str) and k in model_args and k not in NOT_MODEL_INPUTS)


def model_input(item: Mapping[Any, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The model's keyword arguments taken from a dict item, trimmed to its real tokens.  May copy.

    Values become tensors.  With an ``attention_mask`` (one row of a tokeniser's
    output, padded to a fixed length or not), every value whose first dimension
    is the mask's length keeps only the positions the mask marks, so the same
    text padded two ways gives the same input, and the same content key.
    Raises ``ValueError`` for a mask with no token.
    """
    x = {k: item[k] if isinstance(item[k], torch.Tensor) else torch.as_tensor(np.asarray(item[k])) for k in keys}
    mask = x.get("attention_mask")
    if mask is None:
        return x
    if mask.ndim != 1:
        raise ValueError(f"attention_mask: expected one item's 1-D mask, got shape {tuple(mask.shape)}; give precompute "
                         "items one at a time (not batches)")
    keep = mask.bool()
    if not bool(keep.any()):
        raise ValueError("attention_mask is all zeros: the item has no token to compute; drop it from the dataset")
    if bool(keep.all()):
        return x
    n = len(mask)
    return {k: v[keep] if v.ndim >= 1 and v.shape[0] == n else v for k, v in x.items()}


# --- items: encode ------------------------------------------------------------------------


def encode_item(item: Any, input: int | str | tuple[str, ...] | None = None,  # noqa: A002
                model_args: frozenset[str] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """Split a raw item into (model input, side values by column name); side is None for a bare item.

    ``input=None``: a tuple item's element 0; a dict item's first key among
    :data:`DEFAULT_INPUT_KEYS`, else — as a Hugging Face tokeniser or
    ``datasets.Dataset`` makes them — its keys that are arguments of the model's
    ``forward`` (``model_args``: ``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``pixel_values`` ...), which become one dict of keyword
    arguments trimmed by the item's own mask (:func:`model_input`); anything
    else (a str, tensor, list, PIL image ...) is the input itself.  An int picks
    a tuple element, a str a dict key, a tuple of str several dict keys.
    Everything else in a tuple or dict is a side column, named by its position
    (``"1"``, ``"2"`` ...) or its key.  Never copies, except to trim.
    """
    if isinstance(item, tuple):
        i = 0 if input is None else input
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"input={input!r} selects a dict key, but the item is a tuple; pass input=<int>")
        if not -len(item) <= i < len(item):
            raise IndexError(f"input={i} is out of range for a tuple item of {len(item)} elements")
        i %= len(item)
        return item[i], {str(j): v for j, v in enumerate(item) if j != i}
    if isinstance(item, Mapping):
        name = input
        if name is None:
            name = next((k for k in DEFAULT_INPUT_KEYS if k in item), None)
            if name is None:
                name = model_input_keys(item, model_args) or None
            if name is None:
                raise KeyError(
                    f"cannot tell which key of a dict item is the model input (keys: {sorted(map(str, item))}); "
                    f"pass input='<key>' (default keys tried: {', '.join(DEFAULT_INPUT_KEYS)}, then the arguments "
                    "of the model's forward)"
                )
        if isinstance(name, tuple):
            missing = [k for k in name if k not in item]
            if missing:
                raise KeyError(f"input={name!r}: the item has no keys {missing} (keys: {sorted(map(str, item))})")
            return model_input(item, name), {str(k): v for k, v in item.items() if k not in name}
        if not isinstance(name, str):
            raise TypeError(f"input={name!r} selects a tuple element, but the item is a dict; pass input='<key>'")
        if name not in item:
            raise KeyError(f"input={name!r}: the item has no such key (keys: {sorted(map(str, item))})")
        return item[name], {str(k): v for k, v in item.items() if k != name}
    if input is not None:
        raise TypeError(f"input={input!r} given, but the item is a {type(item).__name__}, not a tuple or dict")
    return item, None


def item_layout(item: Any, input: int | str | tuple[str, ...] | None = None,  # noqa: A002
                model_args: frozenset[str] | None = None) -> dict[str, Any]:
    """The item's layout as the record's ``sample`` holds it, side columns aside (``type``, ``length``/``keys``,
    ``input``: a list of keys for keyword-argument inputs)."""
    if isinstance(item, tuple):
        i = (0 if input is None else int(input)) % len(item)  # type: ignore[arg-type]
        return {"type": "tuple", "length": len(item), "input": i}
    if isinstance(item, Mapping):
        name: Any = input
        if name is None:
            name = next((k for k in DEFAULT_INPUT_KEYS if k in item), None) or model_input_keys(item, model_args)
        return {"type": "dict", "keys": [str(k) for k in item], "input": list(name) if isinstance(name, tuple) else name}
    return {"type": "bare"}


@dataclass(frozen=True)
class Selector:
    """Where the model input sits in a dataset item (``input=`` of :func:`actstore.precompute`), and the model's
    ``forward`` arguments (for dict items that are keyword arguments)."""

    input: int | str | tuple[str, ...] | None = None
    model_args: frozenset[str] | None = None

    def split(self, item: Any) -> tuple[Any, dict[str, Any] | None]:
        """:func:`encode_item` with this selector's ``input``."""
        return encode_item(item, self.input, self.model_args)

    def structure(self, item: Any) -> dict[str, Any]:
        """:func:`item_layout` with this selector's ``input``."""
        return item_layout(item, self.input, self.model_args)


# --- side values: encode and decode -------------------------------------------------------

_SIDE_FLOATS = {"float64": "float32", "float32": "float32", "float16": "float16"}
_SIDE_INTS = ("int8", "int16", "int32", "int64", "uint8", "bool")


def value_kind(value: Any) -> str:
    """How a side value comes back (a record ``kind``): a Python scalar, str, bytes, numpy array or tensor."""
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


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def encode_side(name: str, value: Any) -> tuple[str, Field]:
    """The kind and field of a side value: scalars → shape (), arrays → their shape, str/bytes → ragged uint8."""
    kind = value_kind(value)
    if kind in ("bool", "int", "float"):
        return kind, Field((), {"bool": "bool", "int": "int64", "float": "float32"}[kind])
    if kind in ("str", "bytes"):
        return kind, Field((None,), "uint8")
    if isinstance(value, (np.ndarray, torch.Tensor, list, tuple)):
        arr = _array(value)
        dtype = _SIDE_FLOATS.get(arr.dtype.name) or (arr.dtype.name if arr.dtype.name in _SIDE_INTS else None)
        if dtype is None:
            raise TypeError(f"side column {name!r}: cannot store an array of {arr.dtype}; convert it, or drop the "
                            f"column with side_fields={{{name!r}: None}}")
        return ("tensor" if isinstance(value, torch.Tensor) else "array"), field_of(arr, dtype=dtype)
    raise TypeError(
        f"side column {name!r}: cannot store a {type(value).__name__} (store bool, int, float, str, bytes, arrays or "
        f"tensors); drop it with side_fields={{{name!r}: None}} or pick the input with input=..."
    )


#: The older name of :func:`encode_side`.
side_kind = encode_side


def decode_side(v: torch.Tensor, kind: str) -> Any:
    """A stored side value (a view) as the dataset item held it (the mirror of :func:`encode_side`)."""
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](v.item())
    if kind == "str":
        return bytes(v.numpy()).decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes(v.numpy())
    return v.numpy() if kind == "array" else v


@dataclass
class SideColumn:
    name: str  # the tuple position or dict key
    field: str  # the store field
    kind: str
    spec: Field

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "field": self.field, "kind": self.kind}


#: Side kinds whose values must all be of that kind (arrays and tensors are checked by shape instead).
_SCALAR_KINDS = frozenset({"bool", "int", "float", "str", "bytes"})


class _Missing:
    pass


_MISSING = _Missing()


class SideColumns:
    """Converts per-item side values into store columns (fixed arrays or ragged batches)."""

    def __init__(self, columns: list[SideColumn]) -> None:
        self.columns = columns

    @property
    def fields(self) -> list[str]:
        """The store field of each column, in order."""
        return [c.field for c in self.columns]

    def convert(self, sides: list[dict[str, Any] | None], positions: Sequence[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.columns:
            values = [s[c.name] if s is not None and c.name in s else _MISSING for s in sides]
            for v, p in zip(values, positions, strict=True):
                if v is _MISSING:
                    raise ValueError(f"dataset[{p}]: side column {c.name!r} is missing (the first item had it)")
                if c.kind in _SCALAR_KINDS and value_kind(v) != c.kind:
                    raise ValueError(f"dataset[{p}]: side column {c.name!r} is a {value_kind(v)} "
                                     f"({type(v).__name__} {v!r:.40}), but the first item's is a {c.kind}: a column "
                                     "must hold one type (convert it in the dataset, or drop it with "
                                     f"side_fields={{{c.name!r}: None}})")
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


class PositionSides:
    """The side values and input key of every dataset position placed so far, for the view's columns (FORMAT.md §8).

    Side values belong to positions, not to rows: two positions with one input
    (one row) keep their own labels.  The keys and fixed columns are
    :class:`~actstore.storage.scratch.ScratchArray` s (in scratch files under
    ``directory`` when given: page cache, not the heap), ragged and str/bytes
    columns numpy chunks, one per DataLoader batch (no Python object per
    position): a fixed column costs its bytes per position, a str/bytes column
    its bytes plus 8 (a length), the key 32.
    """

    def __init__(self, side: SideColumns, directory: str | None = None) -> None:
        self.side = side
        self.keys = ScratchArray(np.uint8, (32,), directory)
        self.fixed = {c.field: ScratchArray(c.spec.spec.numpy, c.spec.inner_shape, directory)
                      for c in side.columns if c.kind not in ("str", "bytes") and not c.spec.ragged}
        self.chunks: dict[str, list[Any]] = {c.field: [] for c in side.columns if c.field not in self.fixed}

    def add(self, keys: np.ndarray, sides: list[dict[str, Any] | None], positions: Sequence[int]) -> None:
        """Positions ``positions`` (the next ones, in order): their input keys and side values (copied)."""
        self.keys.append(keys)
        if not self.side.columns:
            return
        for c, value in zip(self.side.columns, self.side.convert(sides, positions).values(), strict=True):
            if c.field in self.fixed:
                self.fixed[c.field].append(value)
                continue
            if isinstance(value, RaggedBatch):
                offsets = value.offsets.numpy()
                value = (value.values.numpy(), np.diff(offsets))
            elif isinstance(value, list):  # a ragged array column: its rows back to back, and their lengths
                inner = c.spec.inner_shape
                flat = np.concatenate(value) if value else np.empty((0, *inner), c.spec.spec.numpy)
                value = (flat.astype(c.spec.spec.numpy, copy=False), np.array([len(v) for v in value], np.int64))
            self.chunks[c.field].append(value)

    def view_columns(self) -> tuple[dict[str, Any], dict[str, Field], np.ndarray]:
        """(column -> values per position, column -> field, item keys ``(n, 32)``) for ``store.set_view``.

        The keys and fixed columns are returned as kept (never copied); ragged columns are concatenated (a copy).
        """
        data: dict[str, Any] = {}
        for c in self.side.columns:
            if c.field in self.fixed:
                data[c.field] = self.fixed[c.field].view()
                continue
            parts = self.chunks[c.field]
            if c.spec.ragged:
                values = np.concatenate([p[0] for p in parts]) if parts else \
                    np.empty((0, *c.spec.inner_shape), c.spec.spec.numpy)
                offsets = np.zeros(sum(len(p[1]) for p in parts) + 1, np.int64)
                if parts:
                    np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
                data[c.field] = RaggedBatch(torch.from_numpy(values), torch.from_numpy(offsets))
            else:
                data[c.field] = np.concatenate(parts) if parts else \
                    np.empty((0, *c.spec.inner_shape), c.spec.spec.numpy)
        return data, {c.field: c.spec for c in self.side.columns}, self.keys.view()


# --- items: decode ------------------------------------------------------------------------


def item_part(item: Any, k: Any) -> Any:
    """Part ``k`` of an item (None: the whole item; a tuple of keys: the model's keyword arguments, trimmed)."""
    if k is None:
        return item
    if isinstance(k, tuple):
        return model_input(item, k)
    return item[k]


@dataclass(frozen=True)
class ItemLayout:
    """The structure of ``dataset[i]`` for :func:`decode_item`: its type, parts, input part and side fields."""

    kind: str  # "bare", "mapping", "namedtuple", "sequence"
    type: type
    parts: tuple[Any, ...]
    input: Any
    side: Mapping[Any, str]  # part -> field
    kinds: Mapping[Any, str]  # part -> how its value comes back (see decode_side)
    input_name: Any = None  # the key the input part gets in a rebuilt mapping (None: its own)

    @classmethod
    def of(cls, item: Any, input: Any, side: Mapping[Any, str], where: str,  # noqa: A002
           record: ItemRecord | None = None) -> ItemLayout:
        """The layout of ``item`` (the dataset's first item) with the input part and side fields given.

        Side kinds come from ``record`` (what precompute recorded) for the
        columns it names, else from the item's own values.  Raises
        :class:`DatasetMismatchError` when the item does not have the parts.
        """
        if input is None or item is None:
            if side and item is not None:
                raise ValueError(f"{where}: side fields {dict(side)} need items with parts, but the input is the whole item")
            return cls("bare", type(item), (), None, {}, {})
        if isinstance(item, Mapping):
            kind, parts = "mapping", tuple(item.keys())
            seen = record.keys if record is not None and record.type == "dict" else None
            new = [k for k in parts if seen is not None and k not in seen]
            if new:  # a part precompute never saw has no stored value: it would be served as None
                raise DatasetMismatchError(
                    f"{where}: items have parts {new} that precompute did not see (it recorded "
                    f"{list(seen or ())}), so no value of theirs is stored; precompute today's dataset again "
                    "(actstore.precompute(..., overwrite=True): the item layout changed), or drop those parts")
            if isinstance(input, (tuple, list)):  # keyword-argument inputs: activations under the first key
                extra = set(input[1:])
                parts = tuple(k for k in parts if k not in extra)
                input = input[0] if input else None
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
        recorded = {} if record is None else {record.part(s.name): (s.field, s.kind) for s in record.side}
        kinds = {k: recorded[k][1] if recorded.get(k, ("",))[0] == f else value_kind(item[k]) for k, f in side.items()}
        return cls(kind, type(item), parts, input, dict(side), kinds)


def decode_item(layout: ItemLayout, value: Any, side: Mapping[Any, Any]) -> Any:
    """An item (or batch) of ``layout``'s structure: ``value`` as the input part, ``side`` values by part; parts that
    were not stored are None.  The mirror of :func:`encode_item`."""
    if layout.kind == "bare":
        return value
    vals = [value if k == layout.input else side.get(k) for k in layout.parts]
    if layout.kind == "mapping":
        keys = layout.parts if layout.input_name is None else \
            [layout.input_name if k == layout.input else k for k in layout.parts]
        d = dict(zip(keys, vals, strict=True))
        try:
            return d if layout.type is dict else layout.type(d)
        except Exception:  # a mapping type that cannot be built from a dict
            return d
    if layout.kind == "namedtuple":
        return layout.type(*vals)
    return layout.type(vals)


def infer_input(dataset: Any, n: int) -> Any:
    """The input part of items when no precompute record says: precompute's own rule (a tuple's element 0, a dict's
    first default key), read off the first item; the whole item when the rule cannot tell."""
    if not n:
        return None
    first = dataset[0]
    try:
        Selector().split(first)
    except (KeyError, TypeError):  # a dict with none of the default keys: the whole item, as before (input= picks)
        return None
    layout = item_layout(first)
    return None if layout["type"] == "bare" else layout["input"]
