"""The precompute record: what :func:`actstore.precompute` writes to ``attrs["precompute"]`` (docs/FORMAT.md §14).

:class:`~actstore.training.recycled.CachedDataset` depends on it to rebuild
the user's items: which layers were captured into which fields, how an item
was split into the model input and side columns, and which view maps dataset
positions to rows.  One frozen dataclass, built with :meth:`PrecomputeRecord.to_json`
and parsed with :meth:`PrecomputeRecord.from_json` — strictly, as the manifest
is: a record of another version raises :class:`~actstore.errors.UnsupportedFormatError`,
a malformed one :class:`~actstore.errors.CorruptStoreError` naming where.
No file I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import CorruptStoreError, UnsupportedFormatError

__all__ = [
    "ITEM_KINDS",
    "KEY_SCHEMES",
    "AUGMENTED_RECORD_VERSION",
    "RECORD_ATTR",
    "RECORD_VERSION",
    "RECORD_VERSIONS",
    "SIDE_KINDS",
    "ItemRecord",
    "LayerRecord",
    "PrecomputeRecord",
    "SideRecord",
    "read_record",
]

#: Key of the record in the store's attrs.
RECORD_ATTR = "precompute"
RECORD_VERSION = 2
#: The version of a record with stored augmentations (``augment``, ``augmentations``); written only for those, so
#: that a store without augmentations stays readable by readers of version 2.
AUGMENTED_RECORD_VERSION = 3
#: Versions a reader accepts: 1 (rows keyed by the raw items), 2 (the record names the key scheme) and 3 (stored
#: augmentations).
RECORD_VERSIONS = (1, 2, 3)
#: How rows are keyed: "inputs" — the model inputs as fed (each sample's part of the collated batch, trimmed to
#: its tokens); "items" — ``key_fn(item's input)`` on the raw item (every version-1 store).
KEY_SCHEMES = ("inputs", "items")
#: How an item was laid out: the input alone, a tuple, or a dict.
ITEM_KINDS = ("bare", "tuple", "dict")
#: How a side value comes back to the user (see actstore.precompute.items.decode_side).
SIDE_KINDS = ("bool", "int", "float", "str", "bytes", "array", "tensor")

_TOP = {"version", "layers", "sample", "view", "dataset_length", "dataset_class", "model_class", "store_dtype",
        "key_fn", "collate_fn", "placeholder", "keys", "lengths_fn", "augment", "augmentations", "autocast"}
#: The dtypes a precompute may run its forward under (``autocast``): rows computed so are not the model's own.
AUTOCAST_DTYPES = ("float16", "bfloat16")
_TOP_V2 = _TOP - {"augment", "augmentations"}
_TOP_V1 = _TOP_V2 - {"keys", "lengths_fn"}
_ITEM = {"type", "length", "keys", "input", "side", "dropped"}


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """One captured layer: the module name, its store field, and whether it is stored per token (ragged)."""

    layer: str
    field: str
    ragged: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "field": self.field, "ragged": self.ragged}


@dataclass(frozen=True, slots=True)
class SideRecord:
    """One side column: its name in the item (tuple position as a str, or dict key), its field, its kind."""

    name: str
    field: str
    kind: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "field": self.field, "kind": self.kind}


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """The layout of the dataset's items (as the first item showed it).

    ``type`` is one of :data:`ITEM_KINDS`; ``input`` the tuple position (int) or
    dict key (str) of the model input, None for a bare item; ``length`` the
    tuple's length, ``keys`` the dict's keys.
    """

    type: str = "bare"
    input: int | str | tuple[str, ...] | None = None
    length: int | None = None
    keys: tuple[str, ...] | None = None
    side: tuple[SideRecord, ...] = ()
    dropped: tuple[str, ...] = ()

    def part(self, name: str) -> int | str:
        """The item part a side column's ``name`` refers to (an int position for a tuple)."""
        return int(name) if self.type == "tuple" else name

    @classmethod
    def from_json(cls, doc: Any, where: str = "attrs.precompute.sample") -> ItemRecord:
        """Parse the ``sample`` entry of a record (strict, as :meth:`PrecomputeRecord.from_json`)."""
        return _item(doc, where)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": self.type}
        if self.type == "tuple":
            doc.update(length=self.length, input=self.input)
        elif self.type == "dict":
            doc.update(keys=list(self.keys or ()), input=list(self.input) if isinstance(self.input, tuple) else self.input)
        doc.update(side=[s.to_json() for s in self.side], dropped=list(self.dropped))
        return doc


@dataclass(frozen=True, slots=True)
class PrecomputeRecord:
    """``attrs["precompute"]``, version :data:`RECORD_VERSION` (docs/FORMAT.md §14).

    ``keys`` says how rows are keyed (:data:`KEY_SCHEMES`): a version-1 record
    parses as ``"items"`` (and writes back as version 1); ``lengths_fn`` is the
    qualified name of the token-length function the input keys were trimmed by.
    ``augmentations`` (``K``, version 3) is the number of stored augmentations
    per dataset position, made by ``augment`` (its qualified name): the view
    then lists ``dataset_length * K`` positions, ``p * K + v`` holding
    augmentation ``v`` of item ``p`` (docs/FORMAT.md §11.3, §14).

    Examples
    --------
    >>> r = PrecomputeRecord(layers=(LayerRecord("encoder.layer.2", "encoder.layer.2", True),), dataset_length=3)
    >>> PrecomputeRecord.from_json(r.to_json(), "attrs.precompute") == r
    True
    """

    layers: tuple[LayerRecord, ...] = ()
    item: ItemRecord | None = field(default_factory=ItemRecord)  #: None: a placeholder (empty dataset)
    view: str = "dataset"
    dataset_length: int | None = None  #: None: an iterable dataset
    dataset_class: str | None = None
    model_class: str | None = None
    store_dtype: str | None = None
    key_fn: str | None = "actstore.key"
    collate_fn: str | None = None
    placeholder: bool = False
    keys: str = "inputs"
    lengths_fn: str | None = None
    augment: str | None = None  #: the augment's qualified name (version 3)
    augmentations: int = 1  #: stored augmentations per dataset position (version 3); 1: none
    autocast: str | None = None  #: the dtype the forward ran under autocast to; None: the model's own (absent)
    version: int = RECORD_VERSION

    @property
    def side_fields(self) -> dict[int | str, str]:
        """Item part → side field."""
        if self.item is None:
            return {}
        return {self.item.part(s.name): s.field for s in self.item.side}

    @property
    def layer_fields(self) -> tuple[str, ...]:
        return tuple(d.field for d in self.layers)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "layers": [d.to_json() for d in self.layers],
            "sample": None if self.item is None else self.item.to_json(),
            "view": self.view,
            "dataset_length": self.dataset_length,
            "dataset_class": self.dataset_class,
            "model_class": self.model_class,
            "store_dtype": self.store_dtype,
            "key_fn": self.key_fn,
            "collate_fn": self.collate_fn,
        }
        if self.version >= 2:
            doc["keys"] = self.keys
            doc["lengths_fn"] = self.lengths_fn
        if self.version >= 3:
            doc["augment"] = self.augment
            doc["augmentations"] = self.augmentations
        if self.placeholder:
            doc["placeholder"] = True
        if self.autocast is not None:  # (absent otherwise: a record without it reads as before everywhere)
            doc["autocast"] = self.autocast
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str = "attrs.precompute") -> PrecomputeRecord:
        """Parse a record; keys other than ``version`` and ``layers`` may be absent (their defaults apply).

        Raises :class:`UnsupportedFormatError` for another version and
        :class:`CorruptStoreError` (naming the ``where`` path) for anything else
        that is not the documented shape.
        """
        d = _mapping(doc, where)
        version = d.get("version")
        if type(version) is not int or version not in RECORD_VERSIONS:  # (True == 1 and 1.0 == 1 in Python)
            if type(version) is int:
                raise UnsupportedFormatError(
                    f"Unsupported precompute record version: got {version}. Expected {RECORD_VERSION} (or 1, or 3 with stored "
                    f"augmentations) "
                    f"({where}); this store was written by another actstore version: upgrade actstore, or rerun "
                    "precompute with overwrite=True")
            raise CorruptStoreError(f"{where}.version: expected the integer {RECORD_VERSION}, got {version!r}")
        _only(d, _TOP if version >= 3 else _TOP_V2 if version == 2 else _TOP_V1, where)
        augmentations = _int(d.get("augmentations", 1), f"{where}.augmentations")
        if augmentations < 1 or (version >= 3) != (augmentations > 1):
            raise CorruptStoreError(f"{where}.augmentations: expected an integer >= 2 in a version-3 record (1, or "
                                    f"absent, before), got {augmentations!r} in version {version}")
        if version >= 2:
            scheme = d.get("keys")
            if scheme not in KEY_SCHEMES:
                raise CorruptStoreError(f"{where}.keys: expected one of {list(KEY_SCHEMES)}, got {scheme!r}")
        else:
            scheme = "items"  # version 1: rows keyed by key_fn of the raw item
        layers = tuple(_layer(x, f"{where}.layers[{i}]") for i, x in enumerate(_list(d.get("layers"), f"{where}.layers")))
        sample = d.get("sample", {})
        autocast = _opt_str(d.get("autocast"), f"{where}.autocast")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise CorruptStoreError(f"{where}.autocast: expected one of {list(AUTOCAST_DTYPES)} or absent, got {autocast!r}")
        return cls(
            layers=layers,
            item=None if sample is None else _item(sample, f"{where}.sample"),
            view=_str(d.get("view", "dataset"), f"{where}.view"),
            dataset_length=_opt_int(d.get("dataset_length"), f"{where}.dataset_length"),
            dataset_class=_opt_str(d.get("dataset_class"), f"{where}.dataset_class"),
            model_class=_opt_str(d.get("model_class"), f"{where}.model_class"),
            store_dtype=_opt_str(d.get("store_dtype"), f"{where}.store_dtype"),
            key_fn=_opt_str(d.get("key_fn", "actstore.key"), f"{where}.key_fn"),
            collate_fn=_opt_str(d.get("collate_fn"), f"{where}.collate_fn"),
            placeholder=_bool(d.get("placeholder", False), f"{where}.placeholder"),
            keys=scheme,
            lengths_fn=_opt_str(d.get("lengths_fn"), f"{where}.lengths_fn"),
            augment=_opt_str(d.get("augment"), f"{where}.augment"),
            augmentations=augmentations,
            autocast=autocast,
            version=version,
        )


def read_record(attrs: Mapping[str, Any], where: str = "attrs") -> PrecomputeRecord | None:
    """The record in a store's attrs, or None when precompute did not write the store."""
    doc = attrs.get(RECORD_ATTR) if isinstance(attrs, Mapping) else None
    return None if doc is None else PrecomputeRecord.from_json(doc, f"{where}.{RECORD_ATTR}")


# -- strict parsing -------------------------------------------------------------------------


def _mapping(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise CorruptStoreError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _only(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(str(k) for k in doc if k not in allowed)
    if extra:
        raise CorruptStoreError(f"{where}: unknown keys {extra} (allowed: {sorted(allowed)})")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise CorruptStoreError(f"{where}: expected a JSON array, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CorruptStoreError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str):  # dict keys may be any string
        raise CorruptStoreError(f"{where}: expected a string, got {value!r}")
    return value


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise CorruptStoreError(f"{where}: expected an integer in [0, 2**53), got {value!r}")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise CorruptStoreError(f"{where}: expected true or false, got {value!r}")
    return value


def _layer(doc: Any, where: str) -> LayerRecord:
    d = _mapping(doc, where)
    _only(d, {"layer", "field", "ragged"}, where)
    layer = d.get("layer")
    if not isinstance(layer, str):  # "" is the model's output
        raise CorruptStoreError(f"{where}.layer: expected a string, got {layer!r}")
    return LayerRecord(layer, _str(d.get("field"), f"{where}.field"), _bool(d.get("ragged", False), f"{where}.ragged"))


def _item(doc: Any, where: str) -> ItemRecord:
    d = _mapping(doc, where)
    _only(d, _ITEM, where)
    kind = d.get("type", "bare")
    if kind not in ITEM_KINDS:
        raise CorruptStoreError(f"{where}.type: expected one of {list(ITEM_KINDS)}, got {kind!r}")
    side = []
    for i, s in enumerate(_list(d.get("side", []), f"{where}.side")):
        sw = f"{where}.side[{i}]"
        sd = _mapping(s, sw)
        _only(sd, {"name", "field", "kind"}, sw)
        name = sd.get("name")
        if not isinstance(name, str):
            raise CorruptStoreError(f"{sw}.name: expected a string, got {name!r}")
        k = sd.get("kind")
        if k not in SIDE_KINDS:
            raise CorruptStoreError(f"{sw}.kind: expected one of {list(SIDE_KINDS)}, got {k!r}")
        if kind == "tuple" and not name.isdigit():
            raise CorruptStoreError(f"{sw}.name: a tuple item's side column is named by its position, got {name!r}")
        side.append(SideRecord(name, _str(sd.get("field"), f"{sw}.field"), k))
    dropped = tuple(_name(x, f"{where}.dropped[{i}]") for i, x in enumerate(_list(d.get("dropped", []), f"{where}.dropped")))
    if kind == "bare":
        if side:
            raise CorruptStoreError(f"{where}.side: a bare item has no side columns")
        return ItemRecord(dropped=dropped)
    if kind == "tuple":
        pos = _int(d.get("input"), f"{where}.input")
        length = _int(d.get("length"), f"{where}.length")
        if pos >= length:
            raise CorruptStoreError(f"{where}.input: position {pos} is outside a tuple of {length}")
        return ItemRecord("tuple", pos, length, None, tuple(side), dropped)
    keys = tuple(_name(x, f"{where}.keys[{i}]") for i, x in enumerate(_list(d.get("keys"), f"{where}.keys")))
    raw = d.get("input")
    inp: str | tuple[str, ...]
    if isinstance(raw, list):  # the model's keyword arguments
        inp = tuple(_name(x, f"{where}.input[{i}]") for i, x in enumerate(raw))
        if not inp:
            raise CorruptStoreError(f"{where}.input: expected a key or a non-empty list of keys")
    else:
        inp = _name(raw, f"{where}.input")
    return ItemRecord("dict", inp, None, keys, tuple(side), dropped)
