"""The on-disk format in code: names, versions, dtypes and the manifest.

This module is the executable half of ``docs/FORMAT.md``.  It never touches the
disk; :mod:`actstore.engine.segments`, :mod:`actstore.engine.commit` and :mod:`actstore.storage` do the I/O.  Everything
parsed from disk goes through :func:`parse_manifest` and friends, which accept
only the documented shapes and raise :class:`~actstore.errors.CorruptStoreError`
or :class:`~actstore.errors.UnsupportedFormatError` otherwise — never another
exception, and never code execution (JSON only, no pickle).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actstore.errors import CorruptStoreError, UnsupportedFormatError
from actstore.format.codecs import CODECS, LEVELS, codec_json
from actstore.format.quantize import SCHEMES, Scheme

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Field",
    "IndexRunInfo",
    "Manifest",
    "SegmentInfo",
    "array_metadata",
    "chunk_path",
]

FORMAT_NAME = "actstore"
#: The newest format version: a store with a quantised field is written as version 2 (FORMAT.md §1, §4.1);
#: every other store as version 1, so that readers of version 1 still open it.
FORMAT_VERSION = 2
#: The versions this reader opens.
READ_VERSIONS = (1, 2)
#: Key under the root group's ``attributes`` that holds the manifest.
MANIFEST_ATTR = "actstore"
SEGMENT_ATTR = "actstore_segment"
KEY_BYTES = 32
#: Metadata documents larger than this are refused before parsing.
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_NDIM = 8
MAX_DIM = 2**40
#: Directory names inside the store.
SEGMENTS_DIR = "segments"
INDEXES_DIR = "indexes"
VIEWS_DIR = "views"
FIELDS_DIR = "fields"
#: The writer lock: a Zarr group whose attributes name the writer holding it.
LOCK_DIR = "lock"
#: Part stores of a distributed precompute in progress (ordinary stores, one per rank); not part of the store.
PARTS_DIR = "parts"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class _DType:
    name: str
    numpy: np.dtype[Any]  # storage dtype (little-endian)
    torch: torch.dtype
    zarr: str  # Zarr v3 data_type


def _dt(name: str, np_name: str, t: torch.dtype, zarr: str | None = None) -> _DType:
    return _DType(name, np.dtype(np_name), t, zarr or name)


#: Supported field dtypes.  bfloat16 has no Zarr v3 core type: it is stored as
#: ``uint16`` (the raw bit pattern) and the field's dtype says how to view it.
DTYPES: dict[str, _DType] = {
    d.name: d
    for d in (
        _dt("float32", "<f4", torch.float32),
        _dt("float16", "<f2", torch.float16),
        _dt("bfloat16", "<u2", torch.bfloat16, "uint16"),
        _dt("int8", "i1", torch.int8),
        _dt("int16", "<i2", torch.int16),
        _dt("int32", "<i4", torch.int32),
        _dt("int64", "<i8", torch.int64),
        _dt("uint8", "u1", torch.uint8),
        _dt("bool", "?", torch.bool),
    )
}
_TORCH_NAMES = {d.torch: d.name for d in DTYPES.values()}


def dtype_name(dtype: object) -> str:
    """Canonical dtype name for a string, numpy dtype or torch dtype.

    Raises
    ------
    TypeError
        If the dtype is not one a field can hold.
    """
    if isinstance(dtype, torch.dtype):
        name = _TORCH_NAMES.get(dtype)
    elif isinstance(dtype, str) and dtype in DTYPES:
        name = dtype
    else:
        try:  # numpy parses some strings itself ("f4,i8" even goes through ast.literal_eval): any failure is ours
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except Exception:  # noqa: BLE001 - TypeError, ValueError, SyntaxError, ... for a string numpy cannot read
            name = None
        if name not in DTYPES or name == "bfloat16":
            name = name if name in DTYPES else None
    if name is None:
        raise TypeError(
            f"dtype: unsupported field dtype {dtype!r}; expected one of {sorted(DTYPES)}"
        )
    return name


@dataclass(frozen=True, slots=True)
class Field:
    """The per-sample shape and dtype of one stored column.

    A leading ``None`` in ``shape`` makes the field *ragged*: each row has its
    own first dimension (for example tokens × hidden), stored without padding.

    Examples
    --------
    >>> Field((None, 384), "float16").ragged
    True
    >>> Field((), "int64").row_bytes
    8
    """

    shape: tuple[int | None, ...]
    dtype: str = "float32"
    #: None (raw bytes, read zero-copy) or ``"zstd"`` (smaller, read by decompressing: always copies).
    compression: str | None = None
    #: zstd level (-7 fastest ... 22 smallest); only with ``compression``.
    level: int = 3
    #: None, ``"int8"`` or ``"float8_e4m3"``: store codes plus one float32 scale per row (per token of a ragged
    #: field), read back as ``dtype`` (FORMAT.md §4.1).  Floating fields only; reads always copy.
    quantize: str | None = None

    def __init__(self, shape: Any = (), dtype: object = "float32", compression: str | None = None,
                 level: int = 3, quantize: str | None = None) -> None:
        if isinstance(shape, int) or shape is None:
            shape = (shape,)
        try:
            shape = tuple(shape)
        except TypeError as e:
            raise TypeError(f"shape: expected a tuple of ints, got {shape!r}") from e
        if len(shape) > MAX_NDIM:
            raise ValueError(f"shape: at most {MAX_NDIM} dimensions, got {shape!r}")
        for i, d in enumerate(shape):
            if d is None and i == 0:
                continue
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 < d <= MAX_DIM:
                raise ValueError(
                    f"shape: dimensions must be positive ints (a leading None for a ragged "
                    f"field), got {shape!r}"
                )
        if math.prod(int(d) for d in shape if d is not None) > MAX_DIM:  # (keeps byte counts far from 2**63)
            raise ValueError(f"shape: at most {MAX_DIM} elements per row, got {shape!r}")
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in shape))
        object.__setattr__(self, "dtype", dtype_name(dtype))
        if compression is not None and compression not in CODECS:
            raise ValueError(f"compression: expected None or one of {list(CODECS)}, got {compression!r}")
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or int(level) not in LEVELS:
            raise ValueError(f"level: expected an int in [{LEVELS[0]}, {LEVELS[-1]}], got {level!r}")
        object.__setattr__(self, "compression", compression)
        object.__setattr__(self, "level", int(level) if compression is not None else 3)
        if quantize is not None:
            if quantize not in SCHEMES:
                raise ValueError(f"quantize: expected None or one of {list(SCHEMES)}, got {quantize!r}")
            if not self.spec.torch.is_floating_point:
                raise ValueError(f"quantize: only floating fields can be quantised, not a {self.dtype} field")
            if compression is not None:
                raise ValueError("quantize and compression cannot be combined (a quantised field is stored raw; "
                                 "int8 codes already halve float16's size)")
        object.__setattr__(self, "quantize", quantize)

    @property
    def ragged(self) -> bool:
        """True when the first dimension varies per row."""
        return len(self.shape) > 0 and self.shape[0] is None

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """Shape of one stored element: the row shape, less the ragged dimension."""
        dims = self.shape[1:] if self.ragged else self.shape
        return tuple(int(d) for d in dims if d is not None)

    @property
    def spec(self) -> _DType:
        """The field's dtype: what reads return (for a quantised field, not what is stored: see :attr:`stored`)."""
        return DTYPES[self.dtype]

    @property
    def scheme(self) -> Scheme | None:
        """The quantisation scheme, or None for a field stored as its dtype."""
        return SCHEMES[self.quantize] if self.quantize is not None else None

    @property
    def stored(self) -> _DType:
        """The dtype of the stored values array: the field's dtype, or a quantised field's codes."""
        q = self.scheme
        if q is None:
            return self.spec
        return _DType(q.name, q.numpy, q.torch, q.zarr)

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one element (one row for fixed fields, one token for ragged), scales not counted."""
        return int(np.prod(self.inner_shape, dtype=np.int64)) * self.stored.numpy.itemsize

    @property
    def codec(self) -> dict[str, Any] | None:
        """The Zarr codec entry of the field's inner chunks after ``bytes`` (None when uncompressed)."""
        return codec_json(self.level) if self.compression is not None else None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.compression is not None:  # absent for raw fields: their documents stay as they were
            doc["compression"] = {"name": self.compression, "level": self.level}
        if self.quantize is not None:
            doc["quantize"] = {"name": self.quantize, "scales": "float32"}
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str, version: int = FORMAT_VERSION) -> Field:
        doc = _expect(doc, dict, where)
        _only_keys(doc, {"shape", "dtype", "compression"} | ({"quantize"} if version >= 2 else set()), where)
        shape = _expect(doc.get("shape"), list, f"{where}.shape")
        comp: dict[str, Any] = {}
        if "compression" in doc:
            c, name = _named_entry(doc, "compression", {"name", "level"}, CODECS, "codec", where)
            comp = {"compression": name, "level": _expect(c.get("level"), int, f"{where}.compression.level")}
        if "quantize" in doc:
            qd, comp["quantize"] = _named_entry(doc, "quantize", {"name", "scales"}, SCHEMES, "scheme", where)
            if qd.get("scales") != "float32":
                raise CorruptStoreError(f"{where}.quantize.scales: expected \"float32\", got {qd.get('scales')!r:.40}")
        dtype = _expect(doc.get("dtype"), str, f"{where}.dtype")
        if dtype not in DTYPES:  # stored names are canonical: nothing else is handed to numpy's parser
            raise CorruptStoreError(f"{where}.dtype: {dtype[:40]!r} is not one of {sorted(DTYPES)}")
        try:
            return cls(tuple(shape), dtype, **comp)
        except (TypeError, ValueError) as e:
            raise CorruptStoreError(f"{where}: {e}") from e


def _named_entry(doc: Mapping[str, Any], key: str, keys: set[str], supported: Collection[str], what: str,
                 where: str) -> tuple[dict[str, Any], str]:
    """A field's ``{"name": ..., ...}`` entry ``doc[key]`` and its name, which must be one this reader supports."""
    entry = _expect(doc[key], dict, f"{where}.{key}")
    _only_keys(entry, keys, f"{where}.{key}")
    name = _expect(entry.get("name"), str, f"{where}.{key}.name")
    if name not in supported:
        raise UnsupportedFormatError(f"{where}.{key}: {what} {name[:40]!r} is not supported by this version of "
                                     f"actstore (it reads {list(supported)}); upgrade actstore")
    return entry, name


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One committed, immutable segment: ``rows`` rows of every field."""

    id: str
    rows: int
    values: Mapping[str, int]  # ragged field -> number of stored elements
    meta: str  # BLAKE3 hex of the segment's zarr.json

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows, "values": dict(self.values), "meta": self.meta}


@dataclass(frozen=True, slots=True)
class IndexRunInfo:
    """A small immutable object of ``rows`` entries: a key-index run or a view."""

    id: str
    rows: int
    meta: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows, "meta": self.meta}


@dataclass(frozen=True, slots=True)
class Manifest:
    """The commit point: everything a reader needs to open a snapshot."""

    fields: Mapping[str, Field]
    fingerprint: str | None
    attrs: Mapping[str, Any]
    created: str
    chunk_bytes: int
    generation: int = 0
    segments: tuple[SegmentInfo, ...] = ()
    indexes: tuple[IndexRunInfo, ...] = ()
    #: Named row lists (for example dataset position -> row), see ``ActivationStore.view``.
    views: Mapping[str, IndexRunInfo] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def version(self) -> int:
        """The format version this manifest is written as: 2 when a field is quantised, else 1."""
        return 2 if any(f.quantize is not None for f in self.fields.values()) else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "fields": {k: f.to_json() for k, f in self.fields.items()},
            "fingerprint": self.fingerprint,
            "attrs": dict(self.attrs),
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "generation": self.generation,
            "rows": self.rows,
            "segments": [s.to_json() for s in self.segments],
            "indexes": [r.to_json() for r in self.indexes],
            "views": {k: v.to_json() for k, v in self.views.items()},
        }


def root_document(manifest: Manifest) -> bytes:
    """The root group's ``zarr.json``, carrying the manifest as an attribute."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {MANIFEST_ATTR: manifest.to_json()}}
    return dumps(doc)


def group_document(attributes: Mapping[str, Any] | None = None) -> bytes:
    return dumps({"zarr_format": 3, "node_type": "group", "attributes": dict(attributes or {})})


def dumps(doc: object) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")


def loads(data: bytes, where: str) -> Any:
    """Parse a metadata document, bounded in size and without NaN/Infinity."""
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptStoreError(f"{where}: {len(data)} bytes is larger than the {MAX_METADATA_BYTES}-byte limit")

    def no_constants(name: str) -> None:
        raise CorruptStoreError(f"{where}: invalid JSON constant {name}")

    def finite(text: str) -> float:  # 1e400 would parse as inf
        value = float(text)
        if not math.isfinite(value):
            raise CorruptStoreError(f"{where}: number {text[:40]} is out of range")
        return value

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants, parse_float=finite)
    except CorruptStoreError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"{where}: not valid JSON ({e})") from e


def parse_root(data: bytes, where: str) -> Manifest:
    """Parse the root ``zarr.json`` into a :class:`Manifest`, validating everything."""
    doc = _expect(loads(data, where), dict, where)
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CorruptStoreError(f"{where}: not a Zarr v3 group document")
    attrs = _expect(doc.get("attributes"), dict, f"{where}.attributes")
    if MANIFEST_ATTR not in attrs:
        raise CorruptStoreError(f"{where}: a Zarr group, but not an actstore store (no '{MANIFEST_ATTR}' attribute)")
    return parse_manifest(attrs[MANIFEST_ATTR], f"{where}.attributes.{MANIFEST_ATTR}")


def parse_manifest(doc: Any, where: str) -> Manifest:
    doc = _expect(doc, dict, where)
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{where}: unsupported format {doc.get('format')!r}. Expected {FORMAT_NAME!r}.")
    version = doc.get("version")
    if type(version) is not int or version not in READ_VERSIONS:  # 1.0 and true equal 1 in Python
        raise UnsupportedFormatError(
            f"{where}: unsupported format version: got {version!r:.40}. Expected "
            f"{' or '.join(map(str, READ_VERSIONS))}. Upgrade actstore to read this store."
        )
    fields_doc = _expect(doc.get("fields"), dict, f"{where}.fields")
    fields = {check_name(k, f"{where}.fields"): Field.from_json(v, f"{where}.fields.{k}", version)
              for k, v in fields_doc.items()}
    if version == 2 and not any(f.quantize is not None for f in fields.values()):
        raise CorruptStoreError(f"{where}.version: 2, but no field is quantised (such a store is written as version 1)")
    if not fields:
        raise CorruptStoreError(f"{where}.fields: a store has at least one field")
    fp = doc.get("fingerprint")
    if fp is not None:
        _expect(fp, str, f"{where}.fingerprint")
    segments = tuple(
        _parse_segment(s, fields, f"{where}.segments[{i}]")
        for i, s in enumerate(_expect(doc.get("segments"), list, f"{where}.segments"))
    )
    runs = tuple(
        _parse_run(r, f"{where}.indexes[{i}]") for i, r in enumerate(_expect(doc.get("indexes"), list, f"{where}.indexes"))
    )
    views_doc = _expect(doc.get("views"), dict, f"{where}.views")
    views = {check_name(k, f"{where}.views"): _parse_run(v, f"{where}.views.{k}", lo=0) for k, v in views_doc.items()}
    ids = [s.id for s in segments] + [r.id for r in runs] + [v.id for v in views.values()]
    if len(set(ids)) != len(ids):
        raise CorruptStoreError(f"{where}: a segment or index id appears twice")
    manifest = Manifest(
        fields=fields,
        fingerprint=fp,
        attrs=_expect(doc.get("attrs"), dict, f"{where}.attrs"),
        created=_expect(doc.get("created"), str, f"{where}.created"),
        chunk_bytes=_int(doc.get("chunk_bytes"), f"{where}.chunk_bytes", lo=1),
        generation=_int(doc.get("generation"), f"{where}.generation"),
        segments=segments,
        indexes=runs,
        views=views,
    )
    if _int(doc.get("rows"), f"{where}.rows") != manifest.rows:
        raise CorruptStoreError(f"{where}.rows: {doc.get('rows')} disagrees with the segments' {manifest.rows} rows")
    if sum(r.rows for r in runs) != manifest.rows:
        raise CorruptStoreError(f"{where}.indexes: the key index covers {sum(r.rows for r in runs)} rows, not {manifest.rows}")
    return manifest


def _parse_segment(doc: Any, fields: Mapping[str, Field], where: str) -> SegmentInfo:
    doc = _expect(doc, dict, where)
    _only_keys(doc, {"id", "rows", "values", "meta"}, where)
    values = _expect(doc.get("values"), dict, f"{where}.values")
    ragged = {k for k, f in fields.items() if f.ragged}
    if set(values) != ragged:
        raise CorruptStoreError(f"{where}.values: expected counts for {sorted(ragged)}, got {sorted(values)}")
    return SegmentInfo(
        id=check_id(doc.get("id"), f"{where}.id"),
        rows=_int(doc.get("rows"), f"{where}.rows", lo=1),
        values={k: _int(v, f"{where}.values.{k}") for k, v in values.items()},
        meta=_hex64(doc.get("meta"), f"{where}.meta"),
    )


def _parse_run(doc: Any, where: str, lo: int = 1) -> IndexRunInfo:
    doc = _expect(doc, dict, where)
    _only_keys(doc, {"id", "rows", "meta"}, where)
    return IndexRunInfo(
        id=check_id(doc.get("id"), f"{where}.id"),
        rows=_int(doc.get("rows"), f"{where}.rows", lo=lo),
        meta=_hex64(doc.get("meta"), f"{where}.meta"),
    )


def check_name(name: object, where: str) -> str:
    """A field name: letters, digits, ``_ . -``; no path separators, no leading dot.

    ``zarr.json`` (any case) would collide with the group document beside the
    field's directory, and Zarr v3 reserves names starting with ``__``.
    """
    if (not isinstance(name, str) or not _NAME_RE.match(name) or name.lower() == "zarr.json"
            or name.startswith("__")):
        raise CorruptStoreError(
            f"{where}: invalid name {name!r}; names use letters, digits, '_', '.', '-' "
            "(at most 128, not starting with '.', '-' or '__', and not 'zarr.json')"
        )
    return name


def check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise CorruptStoreError(f"{where}: expected 32 lowercase hex digits, got {value!r:.80}")
    return value


def _hex64(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.match(value):
        raise CorruptStoreError(f"{where}: expected a 64-digit hex BLAKE3 digest, got {value!r:.80}")
    return value


def _int(value: object, where: str, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CorruptStoreError(f"{where}: expected an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise CorruptStoreError(f"{where}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _only_keys(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise CorruptStoreError(f"{where}: unknown entries {sorted(unknown)}")


# --- arrays ------------------------------------------------------------------
#
# Every array is stored as ONE shard (Zarr's sharding codec) whose inner chunks
# use the ``bytes`` codec only.  The shard file therefore starts with the rows
# back to back in C order, so one memory map of the file is one row array; the
# shard index (16 bytes per inner chunk) and its CRC32C follow the data.


def shard_layout(rows: int, inner_rows: int) -> tuple[int, int]:
    """(shard_rows, inner_chunks) for an array of ``rows`` rows."""
    inner = max(1, math.ceil(rows / inner_rows))
    return inner * inner_rows, inner


#: Zarr data types of the internal arrays (keys, offsets, index runs).
INTERNAL_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("u1"), "int64": np.dtype("<i8"), "uint64": np.dtype("<u8")}


def array_metadata(
    rows: int, inner_shape: tuple[int, ...], zarr_dtype: str, inner_rows: int, attributes: Mapping[str, Any] | None = None,
    codec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``zarr.json`` of a single-shard array of ``rows`` rows.

    An empty array (``rows == 0``) gets a one-row chunk grid and no shard file.
    ``codec`` (see :attr:`Field.codec`) compresses each inner chunk after ``bytes``.
    """
    inner_codecs: list[Any] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec is not None:
        inner_codecs.append(dict(codec))
    shard_rows, _ = shard_layout(rows, inner_rows)
    fill: object = False if zarr_dtype == "bool" else 0
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [rows, *inner_shape],
        "data_type": zarr_dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *inner_shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [inner_rows, *inner_shape],
                    "codecs": inner_codecs,
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": dict(attributes or {}),
    }


def chunk_path(ndim: int) -> str:
    """Path of the (only) shard file of an ``ndim``-dimensional array."""
    return "c/" + "/".join("0" for _ in range(ndim))


def inner_rows_for(row_bytes: int, chunk_bytes: int, rows: int) -> int:
    """Rows per inner chunk: about ``chunk_bytes``, never more than the array has."""
    return max(1, min(max(rows, 1), chunk_bytes // max(row_bytes, 1)))
