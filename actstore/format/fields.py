"""A stored column's description: :class:`Field` (shape, dtype, compression, quantisation; docs/FORMAT.md §3-§5)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore.errors import CorruptStoreError
from actstore.format.codecs import CODECS, LEVELS, codec_json
from actstore.format.documents import expect, named_entry, only_keys
from actstore.format.dtypes import DTYPES, DType, dtype_name
from actstore.format.quantize import SCHEMES, Scheme

__all__ = ["MAX_DIM", "MAX_NDIM", "Field"]

MAX_NDIM = 8
MAX_DIM = 2**40


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
    def spec(self) -> DType:
        """The field's dtype: what reads return (for a quantised field, not what is stored: see :attr:`stored`)."""
        return DTYPES[self.dtype]

    @property
    def scheme(self) -> Scheme | None:
        """The quantisation scheme, or None for a field stored as its dtype."""
        return SCHEMES[self.quantize] if self.quantize is not None else None

    @property
    def stored(self) -> DType:
        """The dtype of the stored values array: the field's dtype, or a quantised field's codes."""
        q = self.scheme
        if q is None:
            return self.spec
        return DType(q.name, q.numpy, q.torch, q.zarr)

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one element (one row for fixed fields, one token for ragged), scales not counted."""
        return int(np.prod(self.inner_shape, dtype=np.int64)) * self.stored.numpy.itemsize

    @property
    def codec(self) -> dict[str, Any] | None:
        """The Zarr codec entry of the field's inner chunks after ``bytes`` (None when uncompressed)."""
        return codec_json(self.level) if self.compression is not None else None

    def to_json(self) -> dict[str, Any]:
        """The field's document in the manifest (docs/FORMAT.md section 4); a new dict."""
        doc: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.compression is not None:  # absent for raw fields: their documents stay as they were
            doc["compression"] = {"name": self.compression, "level": self.level}
        if self.quantize is not None:
            doc["quantize"] = {"name": self.quantize, "scales": "float32"}
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str, version: int) -> Field:
        """Parse a field's manifest document of format ``version``; ``CorruptStoreError`` naming ``where`` if bad."""
        doc = expect(doc, dict, where)
        only_keys(doc, {"shape", "dtype", "compression"} | ({"quantize"} if version >= 2 else set()), where)
        shape = expect(doc.get("shape"), list, f"{where}.shape")
        comp: dict[str, Any] = {}
        if "compression" in doc:
            c, name = named_entry(doc, "compression", {"name", "level"}, CODECS, "codec", where)
            comp = {"compression": name, "level": expect(c.get("level"), int, f"{where}.compression.level")}
        if "quantize" in doc:
            qd, comp["quantize"] = named_entry(doc, "quantize", {"name", "scales"}, SCHEMES, "scheme", where)
            if qd.get("scales") != "float32":
                raise CorruptStoreError(f"{where}.quantize.scales: expected \"float32\", got {qd.get('scales')!r:.40}")
        dtype = expect(doc.get("dtype"), str, f"{where}.dtype")
        if dtype not in DTYPES:  # stored names are canonical: nothing else is handed to numpy's parser
            raise CorruptStoreError(f"{where}.dtype: {dtype[:40]!r} is not one of {sorted(DTYPES)}")
        try:
            return cls(tuple(shape), dtype, **comp)
        except (TypeError, ValueError) as e:
            raise CorruptStoreError(f"{where}: {e}") from e
