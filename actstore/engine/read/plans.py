"""Read plans: the per-segment work of ``store[i]`` and of a one-segment gather, done once per segment.

``store[i]`` and ``store.gather(rows)`` spend most of their time, for a small
row or batch, in Python: which kind of field, which map, which dtype view.  A
*plan* does that once per segment (lazily, the first time the segment is read
this way) and keeps, for each field, a small function of the local row(s):

- :func:`row_plan` — ``(name, read)`` pairs, ``read(local)`` giving exactly what
  :func:`~actstore.engine.read.gather.row_view` gives (a view of the map for a plain
  field, viewed as bfloat16 where the field says so);
- :func:`take_plan` — ``(name, take)`` pairs for a gather of rows straight from
  the maps, or None when any field needs the general gather;
- :func:`fast_gather` — ``store.gather(rows)`` of every field through them: one
  ``np.take`` per field for a one-segment store, and for a store of many
  segments one pass per field over the segments the batch touches
  (:func:`~actstore.engine.read.gather.take_across`).

Only a *plain* field (:func:`plain`: raw values of its own dtype, no
compression and no other attribute) whose array is a memory map of that dtype
gets a fast reader; every other field (compressed, read through zarr-python,
or marked by any attribute a later version adds) keeps the general path
(:func:`~actstore.engine.read.gather.row_view` for rows; the whole gather for
:func:`take_plan`).  Plans live in :attr:`SegmentReader.plans
<actstore.engine.read.snapshot.SegmentReader>` and are dropped with the segment's maps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from actstore.engine.read.base import Row, Segment
from actstore.engine.read.gather import NotMapped, row_view, take_across
from actstore.engine.read.joined import Joined, join
from actstore.errors import StoreError
from actstore.format.fields import Field

__all__ = ["ROW_ALL", "RowMany", "RowOne", "RowPlan", "TakePlan", "fast_gather", "make_row", "plain", "row_getter",
           "row_many", "row_one", "row_plan", "take_plan"]

#: The key of a segment's row plan of every field in ``seg.plans`` (``seg.plans.get(ROW_ALL) or row_plan(seg)``).
ROW_ALL = ("row", None)

#: ``(field name, read)``: ``read(local)`` is the field's row ``local`` as a tensor.
RowPlan = tuple[tuple[str, Callable[[int], torch.Tensor]], ...]
#: ``(field name, take)``: ``take(local rows)`` is a new ``(n, *shape)`` tensor of those rows.
TakePlan = tuple[tuple[str, Callable[[np.ndarray], torch.Tensor]], ...]

_from_numpy = torch.from_numpy
_new_dict = dict.__new__


@functools.lru_cache(maxsize=1024)
def plain(field: Field) -> bool:
    """True when ``field`` is stored as raw values of its dtype and nothing else: what the fast paths read.

    A field equal to ``Field(shape, dtype)``: not compressed, and carrying no
    other attribute (an attribute added later makes the field differ from that,
    so it takes the general path until a fast path is written for it).
    """
    return field == Field(field.shape, field.dtype)


def _mapped(array: Any, field: Field) -> bool:
    """True for a memory map (or a view of one) of the field's storage dtype."""
    return type(array) is np.ndarray and array.dtype == field.spec.numpy


def _row_reader(seg: Segment, name: str, field: Field) -> Callable[[int], torch.Tensor]:
    bf16 = field.dtype == "bfloat16"
    if plain(field):
        if field.ragged:
            values, offsets = seg.ragged(name)
            if _mapped(values, field):
                if bf16:
                    return lambda i: _from_numpy(values[offsets[i] : offsets[i + 1]]).view(torch.bfloat16)
                return lambda i: _from_numpy(values[offsets[i] : offsets[i + 1]])
        else:
            arr = seg.fixed(name)
            if _mapped(arr, field):
                if bf16:
                    return lambda i: _from_numpy(arr[i, ...]).view(torch.bfloat16)
                if arr.ndim > 1:
                    return lambda i: _from_numpy(arr[i])
                return lambda i: _from_numpy(arr[i, ...])  # [i, ...] keeps a 0-d view (arr[i] is a numpy scalar)
    return lambda i: row_view(seg, i, name, field)


def row_plan(seg: Any, names: Sequence[str] | None = None) -> RowPlan:
    """The row plan of ``seg`` for ``names`` (all its fields when None), built once and kept in ``seg.plans``."""
    key = ("row", None if names is None else tuple(names))
    plan = seg.plans.get(key)
    if plan is None:
        fields: Mapping[str, Field] = seg.fields
        plan = seg.plans[key] = tuple((n, _row_reader(seg, n, fields[n])) for n in (fields if names is None else names))
    return plan  # type: ignore[no-any-return]


def make_row(plan: RowPlan, local: int, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Row ``local`` of a segment through its plan, as views: a plain dict, or a
    :class:`~actstore.engine.read.base.Row` when the store has ``aliases`` (:func:`~actstore.engine.read.base.row_class`)."""
    row: dict[str, torch.Tensor]
    if aliases:
        row = _new_dict(Row)
        row.aliases = aliases  # type: ignore[attr-defined]
    else:
        row = {}
    for name, read in plan:
        row[name] = read(local)
    return row


#: ``store[i]`` of a one-segment store of one plain fixed field (:func:`row_one`): ``(map, field name, row class)``.
RowOne = tuple[np.ndarray, str, type[dict]]  # type: ignore[type-arg]
#: ``store[i]`` of a store of several segments of one plain fixed field (:func:`row_many`):
#: ``(first row of each segment then the rows, each segment's map then an empty one, field name, row class, rows)``.
RowMany = tuple[list[int], list[np.ndarray], str, type[dict], int]  # type: ignore[type-arg]


def _one_map(seg: Any, names: Sequence[str] | None) -> tuple[np.ndarray, str] | None:
    """``(map, name)`` of the one field read of ``seg`` when it is a plain fixed field of rows with a shape,
    mapped as its dtype (not bfloat16: a tensor of it is a second view), else None."""
    fields: Mapping[str, Field] = seg.fields
    chosen = list(fields) if names is None else list(names)
    if len(chosen) != 1:
        return None
    name = chosen[0]
    f = fields[name]
    if not plain(f) or f.ragged or f.dtype == "bfloat16" or not f.inner_shape:
        return None
    arr = seg.fixed(name)
    if not _mapped(arr, f) or len(arr) != seg.info.rows:
        return None
    return arr, name


def row_one(snap: Any, names: Sequence[str] | None = None) -> RowOne | None:
    """``(map, field name, row class)`` when ``store[i]`` of ``snap`` (``names``: the fields read; None: all) is
    one plain fixed field of rows with a shape in a one-segment store, as a map of its dtype; else None.

    The caller builds the row itself: ``out = cls(); out[name] = torch.from_numpy(map[i])``
    (``cls`` is :attr:`Snapshot.row_type <actstore.engine.read.snapshot.Snapshot>`: ``dict``, or a ``Row``
    carrying the snapshot's aliases), the map's own indexing doing the range check (``map`` holds exactly the
    store's rows, so a negative row counts from the end and any other row
    raises ``IndexError``).  The caller must pass a Python ``int`` (numpy reads a
    ``bool``, a slice or a list as other things).  Kept until the snapshot's maps
    are dropped (:meth:`Snapshot.forget <actstore.engine.read.snapshot.Snapshot.forget>`).
    """
    if len(snap.segments) != 1:
        return None
    one = _one_map(snap.segments[0], names)
    if one is None or len(one[0]) != snap.rows:
        return None
    return one[0], one[1], snap.row_type


def row_many(snap: Any) -> RowMany | None:
    """``(starts, maps, field name, row class, rows)`` when ``store[i]`` of ``snap`` is one plain fixed field of
    rows with a shape (as :func:`row_one`) in a store of several segments; else None.

    ``starts`` is the first global row of each segment and then ``rows`` (a list: :func:`bisect.bisect_right`
    on it is the cheapest lookup of a row's segment), ``maps`` each segment's map of exactly its rows and
    then an empty array.  The caller counts a negative row from the end; with
    ``s = bisect_right(starts, row) - 1``, row ``row`` is ``maps[s][row - starts[s]]``, and a row outside
    ``[0, rows)`` gets ``s`` -1 or ``len(segments)``: the empty array, whose indexing raises ``IndexError``
    (as each map's does for a row past its end).  Kept as :func:`row_one` is.

    Every segment's file is mapped here, so only a local store without ``verify_reads`` gets it (a remote
    store would fetch, and a checked one hash, every segment on the first row read), and only when every
    segment maps: otherwise rows keep the general path, which maps (and reports) each segment when a row of
    it is read.
    """
    if len(snap.segments) < 2 or snap.check is not None or any(seg.provide is not None for seg in snap.segments):
        return None
    maps, name = [], ""
    for seg in snap.segments:  # (every segment has the snapshot's fields)
        try:
            one = _one_map(seg, None)
        except (StoreError, OSError):
            return None
        if one is None:
            return None
        maps.append(one[0])
        name = one[1]
    if sum(len(m) for m in maps) != snap.rows:
        return None
    maps.append(maps[0][:0])  # (rows outside the store: an empty array of the same shape)
    return list(snap.starts_list), maps, name, snap.row_type, snap.rows


def row_getter(snap: Any) -> Callable[[int], dict[str, torch.Tensor]] | None:
    """``store[i]`` of a one-segment store as one closure (its row plan, bounds and aliases bound in), or None.

    Kept in ``snap.plans`` (dropped with the maps, as every plan is); the caller
    passes a Python int.  A store of several segments takes :meth:`Snapshot.locate`.
    (A store of one plain fixed field takes :func:`row_one`, inlined by the caller.)
    """
    if len(snap.segments) != 1:
        return None
    seg = snap.segments[0]
    plan, n, aliases = row_plan(seg), snap.rows, snap.aliases

    def get(row: int) -> dict[str, torch.Tensor]:
        return make_row(plan, checked_row(row, n), aliases)

    return get


def checked_row(row: int, n: int) -> int:
    """``row`` of a store of ``n`` rows as a non-negative row (negative rows count from the end), or IndexError."""
    local = row + n if row < 0 else row
    if not 0 <= local < n:
        raise IndexError(f"row {row} is out of range for a store of {n} rows")
    return local


def _taker(arr: np.ndarray, field: Field) -> Callable[[np.ndarray], torch.Tensor]:
    # np.take's default mode checks every row (negative rows count from the end, as store rows do) and, with
    # no ``out``, writes straight into the array it returns: one copy and no separate range check.
    if field.dtype == "bfloat16":
        return lambda rows: _from_numpy(arr.take(rows, axis=0)).view(torch.bfloat16)
    return lambda rows: _from_numpy(arr.take(rows, axis=0))


def take_plan(seg: Any) -> TakePlan | None:
    """How to gather rows of every field of ``seg`` straight from its maps, or None (a field needs the general path).

    Only for segments whose fields are all plain fixed fields; built once and kept in ``seg.plans``.
    ``take(rows)`` raises ``IndexError`` for a row outside ``[-rows, rows)``.
    """
    if "take" not in seg.plans:
        seg.plans["take"] = _take_plan(seg)
    return seg.plans["take"]  # type: ignore[no-any-return]


def _take_plan(seg: Any) -> TakePlan | None:
    takers: list[tuple[str, Callable[[np.ndarray], torch.Tensor]]] = []
    for name, f in seg.fields.items():
        if f.ragged or not plain(f):
            return None
        arr = seg.fixed(name)
        if not _mapped(arr, f):
            return None
        takers.append((name, _taker(arr, f)))
    return tuple(takers) or None


# -- a gather across segments (engine.read.gather.take_across) ----------------------------------------


def _across_plan(snap: Any) -> tuple[tuple[str, Field, list[np.ndarray | None]], ...] | None:
    fields: Mapping[str, Field] = snap.fields
    if not all(plain(f) and not f.ragged for f in fields.values()):
        return None
    return tuple((name, f, [None] * len(snap.segments)) for name, f in fields.items())


def fast_gather(snap: Any, rows: Any) -> dict[str, torch.Tensor] | None:
    """``store.gather(rows)`` of every field, for a store of plain fixed fields and a 1-D int64 array of rows;
    None when the general path must run (other fields or rows, a row out of range, an array that is not a map)."""
    if type(rows) is not np.ndarray or rows.ndim != 1 or rows.dtype != np.int64:
        return None
    segments = snap.segments
    if len(segments) == 1:
        seg = segments[0]
        one = seg.plans["take"] if "take" in seg.plans else take_plan(seg)
        if one is None:
            return None
        try:
            return {name: take(rows) for name, take in one}
        except IndexError:
            return None  # the general path says which row
    joined = snap.plans.get("joined", False)
    if joined is False:
        joined = snap.plans["joined"] = _joined_plan(snap)
    if joined is not None:  # each field's files side by side in one map: one take per field
        try:
            return {name: _from_numpy(one.take(rows)).view(torch.bfloat16) if bf16
                    else _from_numpy(one.take(rows)) for name, one, bf16 in joined}
        except IndexError:
            return None  # the general path says which row
    if "across" not in snap.plans:
        snap.plans["across"] = _across_plan(snap)
    plan = snap.plans["across"]
    if plan is None or not len(rows) or rows.min() < 0 or rows.max() >= snap.rows:
        return None
    out: dict[str, torch.Tensor] = {}
    for name, f, maps in plan:

        def array(s: int, name: str = name, f: Field = f, maps: list[np.ndarray | None] = maps) -> np.ndarray:
            a = maps[s]
            if a is None:
                a = segments[s].fixed(name)
                if not _mapped(a, f):
                    raise NotMapped
                maps[s] = a
            return a

        result = np.empty((len(rows), *f.inner_shape), f.spec.numpy)
        try:
            take_across(snap.starts, array, rows, result)
        except NotMapped:
            snap.plans["across"] = None
            return None
        t = _from_numpy(result)
        out[name] = t.view(torch.bfloat16) if f.dtype == "bfloat16" else t
    return out


def _joined_plan(snap: Any) -> tuple[tuple[str, Joined, bool], ...] | None:
    """Every field of ``snap`` (plain fixed fields only) in one map each (:func:`~actstore.engine.read.joined.join`),
    or None when any field cannot be."""
    fields: Mapping[str, Field] = snap.fields
    if not all(plain(f) and not f.ragged for f in fields.values()):
        return None
    if any(seg.provide is not None for seg in snap.segments):
        return None  # a remote store: joining would fetch every segment's files; keep mapping only what is read
    plan = []
    for name, f in fields.items():
        arrays = [seg.fixed(name) for seg in snap.segments]
        one = join(arrays, snap.starts_list) if all(_mapped(a, f) for a in arrays) else None
        if one is None:
            return None
        plan.append((name, one, f.dtype == "bfloat16"))
    return tuple(plan)
