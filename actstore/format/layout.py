"""Where things sit in a store (docs/FORMAT.md §2, §4, §4.1): its directories, and which arrays store a field.

The segment writer, the reader, ``verify``, prefetch and the sampler's read-ahead
all walk a field's arrays through :func:`field_arrays`, so a new kind of field
changes this module and not each of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.fields import Field

__all__ = ["FIELDS_DIR", "INDEXES_DIR", "LOCK_DIR", "PARTS_DIR", "SEGMENTS_DIR", "VIEWS_DIR", "VIEW_ITEM_KEY",
           "VIEW_ROW", "ArraySpec", "field_arrays", "field_is_group", "view_arrays"]

#: Directory names inside the store.
SEGMENTS_DIR = "segments"
INDEXES_DIR = "indexes"
VIEWS_DIR = "views"
FIELDS_DIR = "fields"
#: A view object's arrays (FORMAT.md §8): ``row`` (int64, position -> row) and, in version 3, ``item_key``
#: (uint8 ``[n, 32]``) beside its columns (``fields/<name>``, laid out as a segment's fields).
VIEW_ROW = "row"
VIEW_ITEM_KEY = "item_key"
#: The writer lock: a Zarr group whose attributes name the writer holding it.
LOCK_DIR = "lock"
#: Part stores of a distributed precompute in progress (ordinary stores, one per rank), kept under the store's
#: root while the ranks run; not part of the store, and left alone by its creation checks and cleanup.
PARTS_DIR = "parts"


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """One array of a field in a segment (FORMAT.md §4, §4.1)."""

    key: str  # the writer's and reader's name for it: the field name (its values), or name + "/offsets" | "/scales"
    rel: str  # its directory under the segment
    count: str  # how many rows it has: "rows", "rows+1" (offsets) or "values" (a ragged field's element count)
    inner: tuple[int, ...]
    numpy: np.dtype[Any]
    zarr: str
    codec: dict[str, Any] | None = None

    def rows(self, segment_rows: int, values: int) -> int:
        return {"rows": segment_rows, "rows+1": segment_rows + 1, "values": values}[self.count]


def field_arrays(name: str, field: Field) -> tuple[ArraySpec, ...]:
    """The arrays that store field ``name`` in a segment, values first.

    A plain fixed field is one array, ``fields/<name>``.  Otherwise ``fields/<name>``
    is a group of ``values`` (the rows, or a ragged field's elements), ``offsets``
    (ragged: ``rows + 1`` int64) and ``scales`` (quantised: one float32 per row,
    per element of a ragged field).
    """
    base = f"{FIELDS_DIR}/{name}"
    st = field.stored
    per = "values" if field.ragged else "rows"
    if not field_is_group(field):
        return (ArraySpec(name, base, "rows", field.inner_shape, st.numpy, st.zarr, field.codec),)
    out = [ArraySpec(name, f"{base}/values", per, field.inner_shape, st.numpy, st.zarr, field.codec)]
    if field.ragged:
        out.append(ArraySpec(f"{name}/offsets", f"{base}/offsets", "rows+1", (), INTERNAL_DTYPES["int64"], "int64"))
    if field.quantize is not None:
        out.append(ArraySpec(f"{name}/scales", f"{base}/scales", per, (), np.dtype("<f4"), "float32"))
    return tuple(out)


def field_is_group(field: Field) -> bool:
    """True when ``fields/<name>`` is a group of arrays (ragged or quantised) rather than one array."""
    return field.ragged or field.quantize is not None


def view_arrays(columns: Mapping[str, Field], item_key: bool) -> tuple[ArraySpec, ...]:
    """The arrays of a view object with ``columns`` (FORMAT.md §8): ``row``, then ``item_key`` when it has one,
    then each column's arrays as :func:`field_arrays` lays them out (``count`` "rows" meaning the view's positions).
    """
    i64, u8 = INTERNAL_DTYPES["int64"], INTERNAL_DTYPES["uint8"]
    out = [ArraySpec(VIEW_ROW, VIEW_ROW, "rows", (), i64, "int64")]
    if item_key:
        out.append(ArraySpec(VIEW_ITEM_KEY, VIEW_ITEM_KEY, "rows", (32,), u8, "uint8"))
    for name, f in columns.items():
        out.extend(field_arrays(name, f))
    return tuple(out)
