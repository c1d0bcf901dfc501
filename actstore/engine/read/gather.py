"""Gathers: the read path's one copy, from a snapshot's memory maps into new arrays or tensors.

Every read of many rows goes through here, for every kind of field:

- :func:`split_by_segment` — the one segment splitter: a batch of global rows
  as ``(segment, positions, local rows)`` groups (two bisections and no sort
  when the batch lies in one segment, the usual case with chunk-local sampling).
- :func:`take_rows` — the one row gather: rows of one array per segment into a
  numpy output (keys, fixed fields).  Used by the snapshot's key lookup too.
- :func:`gather_fixed`, :func:`gather_padded`, :func:`gather_ragged` — a fixed
  field as one ``(n, *shape)`` tensor, a ragged field right-padded with mask and
  lengths, or back to back as a :class:`~actstore.engine.read.ragged.RaggedBatch`.
- :func:`row_view` — one row without a copy.

Fast paths kept on purpose: ``np.take(..., mode="wrap")`` straight into the
output (rows were range-checked; numpy's default ``"raise"`` gathers into a
temporary and copies again), a cache-sized bounce buffer for casts and for rows
spread over segments (memory still sees one copy), and shared-memory outputs
inside DataLoader workers (as ``default_collate`` does).

This module knows snapshots only through :class:`~actstore.engine.read.base.Rows`
(``segments`` and ``starts``), so :mod:`actstore.engine.read.snapshot` can use
it without a cycle.
"""

from __future__ import annotations

import functools
import threading
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import torch

from actstore.engine.read.base import Rows, Segment, alloc, as_tensor, refuse_overflow
from actstore.engine.read.ragged import PaddedBatch, RaggedBatch
from actstore.errors import MissingRowsError
from actstore.format.fields import Field
from actstore.format.quantize import dequantize

__all__ = [
    "NotMapped",
    "check_pad_multiple",
    "field_names",
    "gather_fields",
    "check_float_dtype",
    "gather_fixed",
    "gather_padded",
    "gather_ragged",
    "row_view",
    "split_by_segment",
    "take_across",
    "take_rows",
]

#: Rows gathered at a time when a cast needs a bounce buffer (kept cache-sized).
_BOUNCE_BYTES = 256 << 10


def check_float_dtype(dtype: Any) -> None:
    """``dtype`` (what floating fields are cast to) must be a floating torch dtype or None."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def _np_target(out: torch.Tensor, field: Field) -> np.ndarray | None:
    """A numpy view of ``out`` that numpy may assign stored values into, or None (use torch)."""
    if field.dtype == "bfloat16" or out.dtype == torch.bfloat16:
        if field.dtype == "bfloat16" and out.dtype == torch.bfloat16:
            return out.view(torch.int16).numpy().view(np.uint16)  # raw bits to raw bits
        return None
    return out.numpy()


@functools.lru_cache(maxsize=1024)
def _meta(field: Field) -> tuple[tuple[int, ...], int, torch.dtype]:
    """(inner shape, bytes per element, torch dtype) of a field, computed once (the hot path)."""
    return field.inner_shape, field.row_bytes, field.spec.torch


def _out_dtype(field: Field, dtype: torch.dtype | None) -> torch.dtype:
    t = _meta(field)[2]
    return dtype if dtype is not None and t.is_floating_point else t


def _present(rows: np.ndarray) -> np.ndarray | None:
    """Positions of rows >= 0, or None when every row is present."""
    if not len(rows) or rows.min() >= 0:
        return None
    return np.flatnonzero(rows >= 0)


def _no_extra(p: int) -> torch.Tensor:
    raise MissingRowsError(f"batch position {p} has no row in the store and nothing computed for it")


def _need(snap: Rows | None, rows: np.ndarray, name: str) -> Rows:
    if snap is None:
        raise MissingRowsError(f"no store to read {len(rows)} rows of {name!r} from")
    return snap


# -- the splitter and the row gather ----------------------------------------------------------


def split_by_segment(snap: Rows, rows: np.ndarray) -> list[tuple[int, np.ndarray | None, np.ndarray]]:
    """Group rows by segment: ``[(segment, positions in rows or None for all, local rows)]``.

    ``rows`` are checked global rows (``0 <= row < total``).  Positions within a
    segment keep batch order (a stable sort).  Never copies row data.
    """
    starts = snap.starts_list
    if not len(rows):
        return []
    if len(starts) == 2:
        return [(0, None, rows)]
    lo = bisect_right(starts, int(rows.min())) - 1
    hi = bisect_right(starts, int(rows.max())) - 1
    if lo == hi:
        return [(lo, None, rows - starts[lo] if starts[lo] else rows)]
    seg = np.searchsorted(snap.starts, rows, side="right") - 1
    order = np.argsort(seg, kind="stable")  # positions grouped by segment, in batch order within each
    ends = np.cumsum(np.bincount(seg - lo, minlength=hi - lo + 1)).tolist()
    out: list[tuple[int, np.ndarray | None, np.ndarray]] = []
    begin = 0
    for s, end in zip(range(lo, hi + 1), ends, strict=True):
        if end > begin:
            pos = order[begin:end]
            out.append((s, pos, rows[pos] - starts[s]))
        begin = end
    return out


def take_rows(snap: Rows, source: Callable[[Any], Any], rows: np.ndarray, out: np.ndarray | torch.Tensor,
              outpos: np.ndarray | None = None, *, row_bytes: int = 1, field: Field | None = None) -> None:
    """Copy ``rows`` (checked global rows) of the array ``source(segment)`` into ``out[outpos]``.  Always copies, once.

    ``out`` is a numpy array, or a tensor when values are cast on the way
    (``field`` then says how the stored bytes read); ``outpos`` the output
    positions (None: ``0..n-1``).  A same-dtype batch from one segment goes
    straight from the map into ``out``; anything else through a cache-sized
    bounce buffer of ``_BOUNCE_BYTES`` (``row_bytes`` per row).
    """
    tgt = out if not isinstance(out, torch.Tensor) else _np_target(out, field) if field is not None else out.numpy()
    block = max(1, _BOUNCE_BYTES // max(row_bytes, 1))
    if tgt is not None and len(rows) and len(snap.starts_list) > 2 and len(rows) * row_bytes <= _BOUNCE_BYTES and \
            _take_sorted(snap, source, rows, tgt, outpos):
        return
    for s, pos, local in split_by_segment(snap, rows):
        src = source(snap.segments[s])
        dest = pos if outpos is None else (outpos if pos is None else outpos[pos])
        if dest is None and tgt is not None and tgt.dtype == src.dtype:
            # rows were range-checked: 'wrap' skips numpy's buffered bounds check (2x faster)
            np.take(src, local, axis=0, out=tgt, mode="wrap")
            continue
        if dest is None:
            dest = np.arange(len(rows))
        for a in range(0, len(local), block):
            part = np.take(src, local[a : a + block], axis=0, mode="wrap")
            if tgt is not None:
                tgt[dest[a : a + block]] = part
            else:  # a cast numpy cannot do (to or from bfloat16)
                t_out = cast(torch.Tensor, out)  # (tgt is None only for tensor outputs)
                t_out[torch.from_numpy(dest[a : a + block])] = as_tensor(part, field).to(t_out.dtype)


def _take_sorted(snap: Rows, source: Callable[[Any], Any], rows: np.ndarray, tgt: np.ndarray,
                 outpos: np.ndarray | None) -> bool:
    """A batch across segments in one pass (:func:`take_across`) into ``tgt`` (at ``outpos``: None for in order).
    False (nothing written) when a segment's array is not a same-dtype map (compressed, or a cast): the caller's
    general path runs."""
    seen: dict[int, np.ndarray] = {}

    def array(s: int) -> np.ndarray:
        a = seen.get(s)
        if a is None:
            a = source(snap.segments[s])
            if not isinstance(a, np.ndarray) or a.dtype != tgt.dtype:
                raise NotMapped
            seen[s] = a
        return a

    dest = tgt if outpos is None else np.empty((len(rows), *tgt.shape[1:]), tgt.dtype)
    try:
        take_across(snap.starts, array, rows, dest)
    except NotMapped:
        return False
    if outpos is not None:
        tgt[outpos] = dest
    return True


# -- the one gather across segments -------------------------------------------------------------------

#: A reused bounce buffer per thread for gathers across segments of up to this many bytes (larger: a new one).
_SCRATCH_BYTES = 8 << 20
_scratch = threading.local()


def _buffer(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > _SCRATCH_BYTES:
        return np.empty(shape, dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch.buf = np.empty(max(nbytes, 256 << 10), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def take_across(starts: np.ndarray, maps: Callable[[int], np.ndarray], rows: np.ndarray, out: np.ndarray) -> None:
    """Rows (checked global rows, in ``[0, total)``) of arrays spread over segments into ``out``, in batch order.

    ``maps(s)`` is segment ``s``'s array (a same-dtype map), asked for only for
    the segments the batch touches.  One stable sort of the rows by segment, one
    ``take`` per touched segment into its slice of a reused bounce buffer, and
    one ``take`` back into batch order: memory sees the rows read once and the
    (cache-sized) buffer once more; Python runs once per touched segment.
    """
    seg = starts.searchsorted(rows, "right") - 1
    counts = np.bincount(seg, minlength=len(starts) - 1)
    touched = np.flatnonzero(counts).tolist()
    if len(touched) == 1:
        s = touched[0]
        maps(s).take(rows - starts[s], 0, out, "wrap")  # rows were range-checked: 'wrap' skips the check
        return
    order = (seg.astype(np.int16) if len(starts) <= 1 << 15 else seg).argsort(kind="stable")  # (a radix sort)
    local = rows[order] - starts[seg[order]]
    buf = _buffer(out.shape, out.dtype)
    begin = 0
    for s, n in zip(touched, counts[touched].tolist(), strict=True):
        maps(s).take(local[begin : begin + n], 0, buf[begin : begin + n], "wrap")
        begin += n
    inverse = np.empty_like(order)  # the inverse permutation, then a take: faster than a scatter
    inverse[order] = np.arange(len(order))
    buf.take(inverse, 0, out, "wrap")


class NotMapped(Exception):
    """A segment's array is not a map of the wanted dtype (compressed, read through zarr-python, a cast): the
    general path runs."""


# -- fields ---------------------------------------------------------------------------------------


def row_view(seg: Segment, local: int, name: str, field: Field) -> torch.Tensor:
    """Row ``local`` of a segment's field as a tensor.  Never copies (a compressed field: decoded, a copy;
    a quantised field: dequantised into its dtype, a copy)."""
    if field.quantize is not None:
        return _row_dequantized(seg, local, name, field)
    if field.ragged:
        values, offsets = seg.ragged(name)
        return as_tensor(values[offsets[local] : offsets[local + 1]], field)
    return as_tensor(seg.fixed(name)[local, ...], field)  # [i, ...] keeps a 0-d view


def gather_fixed(
    snap: Rows | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gather a fixed-size field into a new ``(n, *shape)`` tensor.  Always copies, once.

    ``rows`` are committed rows (already range-checked) or -1 for positions taken
    from ``extra`` (position → row tensor).  Floating fields are cast to ``dtype``
    on the way.  ``shared`` allocates the result in shared memory.
    """
    out = alloc((len(rows), *_meta(field)[0]), _out_dtype(field, dtype), shared)
    present = _present(rows)
    row_bytes = _meta(field)[1]
    if field.quantize is not None:
        _fixed_dequantized(snap, name, field, rows, present, out)
        present = np.empty(0, np.int64)  # (only the extra rows are left to copy)

    def source(seg: Segment) -> Any:
        return seg.fixed(name)

    if present is None:
        if len(rows):
            take_rows(_need(snap, rows, name), source, rows, out, row_bytes=row_bytes, field=field)
    else:
        if len(present):
            take_rows(_need(snap, rows, name), source, rows[present], out, present, row_bytes=row_bytes, field=field)
        for p in np.flatnonzero(rows < 0).tolist():
            out[p].copy_(extra[p] if extra is not None else _no_extra(p))
    refuse_overflow(out, field, dtype, lambda i: gather_fixed(snap, name, field, rows[i : i + 1])[0]
                     if rows[i] >= 0 else extra[i] if extra is not None else _no_extra(i), lambda i: None)
    return out


def _spans(snap: Rows | None, name: str, rows: np.ndarray, extra: Mapping[int, torch.Tensor] | None,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment, start in its values, length) of each row of a ragged field; segment -1 for ``extra`` rows."""
    n = len(rows)
    starts = np.zeros(n, np.int64)
    lengths = np.zeros(n, np.int64)
    seg_of = np.full(n, -1, np.int64)
    present = _present(rows)
    idx = rows if present is None else rows[present]
    if len(idx):
        s_snap = _need(snap, idx, name)
        for s, pos, local in split_by_segment(s_snap, idx):
            p = (slice(None) if pos is None else pos) if present is None else (present if pos is None else present[pos])
            offsets = s_snap.segments[s].ragged(name)[1]
            starts[p] = offsets[local]
            lengths[p] = offsets[local + 1] - offsets[local]
            seg_of[p] = s
    for p in np.flatnonzero(rows < 0).tolist():
        lengths[p] = len(extra[p]) if extra is not None else len(_no_extra(p))
    return seg_of, starts, lengths


def gather_padded(
    snap: Rows | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    pad_to_multiple_of: int | None = None, pad_value: float = 0, mask_dtype: torch.dtype = torch.bool,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> PaddedBatch:
    """Gather a ragged field into a right-padded batch with its mask and lengths.  Always copies, once.

    Each row is copied from the map straight into its slot of the padded output
    (cast on the way), and only the padding is filled: every output byte is
    written once.  ``rows``/``extra``/``shared`` as in :func:`gather_fixed`.
    """
    n = len(rows)
    seg_of, starts, lengths = _spans(snap, name, rows, extra)
    width = int(lengths.max()) if n else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = alloc((n, width, *_meta(field)[0]), _out_dtype(field, dtype), shared)
    quantized = field.quantize is not None
    if quantized:  # every stored row at once (dequantised into the padded batch), then the extra rows below
        out.fill_(pad_value)
        flat_out = out.view(n * width, *_meta(field)[0])
        for s, pos, elements, within in _ragged_groups(seg_of, starts, lengths):
            dest = np.repeat(pos * width, lengths[pos]) + within
            flat_out[torch.from_numpy(dest)] = _dequantized_elements(snap, s, name, field, elements, out.dtype)
    tgt = _np_target(out, field)
    pad = tgt if tgt is not None else out
    sources: dict[int, Any] = {}
    for i, (s, a, ln) in enumerate(zip(seg_of.tolist(), starts.tolist(), lengths.tolist(), strict=True)):
        if quantized and s >= 0:
            continue  # (dequantised above)
        if s < 0:
            out[i, :ln].copy_(extra[i])  # type: ignore[index]
        else:
            src = sources.get(s)
            if src is None:
                src = sources[s] = snap.segments[s].ragged(name)[0]  # type: ignore[union-attr]
            if tgt is not None:
                tgt[i, :ln] = src[a : a + ln]
            else:
                out[i, :ln].copy_(as_tensor(src[a : a + ln], field))
        if ln < width:
            pad[i, ln:] = pad_value
    refuse_overflow(out, field, dtype, lambda i: gather_padded(snap, name, field, rows[i : i + 1]).values[0]
                     if rows[i] >= 0 else extra[i] if extra is not None else _no_extra(i), lambda i: int(lengths[i]))
    lens = alloc((n,), torch.int64, shared)
    lens.copy_(torch.from_numpy(lengths))
    mask = alloc((n, width), mask_dtype, shared)
    torch.lt(torch.arange(width)[None, :], lens[:, None], out=mask) if mask_dtype == torch.bool else \
        mask.copy_(torch.arange(width)[None, :] < lens[:, None])
    return PaddedBatch(out, mask, lens)


def gather_ragged(snap: Rows, name: str, field: Field, rows: np.ndarray, dtype: torch.dtype | None = None,
                  ) -> RaggedBatch:
    """Gather a ragged field's rows (checked) back to back, as a :class:`RaggedBatch`.  Always copies, once.

    Values come in the stored dtype; a quantised field's are dequantised into
    ``dtype`` (default: its dtype), rounded once from ``float32(code) × scale``."""
    seg_of, starts, lengths = _spans(snap, name, rows, None)
    out_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    groups = _ragged_groups(seg_of, starts, lengths)
    one = len(groups) == 1
    if field.quantize is not None:
        deq = torch.empty((int(out_offsets[-1]), *field.inner_shape), dtype=dtype or field.spec.torch)
        for s, pos, elements, within in groups:
            part = _dequantized_elements(snap, s, name, field, elements, deq.dtype)
            if one:
                deq = part
            else:
                deq[torch.from_numpy(np.repeat(out_offsets[:-1][pos], lengths[pos]) + within)] = part
        return RaggedBatch(deq, torch.from_numpy(out_offsets))
    values = np.empty((int(out_offsets[-1]), *field.inner_shape), field.spec.numpy)
    for s, pos, flat, within in groups:
        src = snap.segments[s].ragged(name)[0]
        if one:  # one segment: straight into the batch, one copy
            np.take(src, flat, axis=0, out=values, mode="wrap")
        else:
            values[np.repeat(out_offsets[:-1][pos], lengths[pos]) + within] = np.take(src, flat, axis=0, mode="wrap")
    return RaggedBatch(as_tensor(values, field), torch.from_numpy(out_offsets))


def _ragged_groups(seg_of: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                   ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Per segment holding some of the rows (``seg_of`` from :func:`_spans`; -1 rows are skipped):
    ``(segment, positions of its rows, their stored elements in batch order, each element's index in its row)``."""
    out = []
    for s in np.unique(seg_of[seg_of >= 0]).tolist():
        pos = np.flatnonzero(seg_of == s)
        n = lengths[pos]
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        out.append((s, pos, np.repeat(starts[pos], n) + within, within))
    return out


# -- quantised fields (FORMAT.md §4.1): codes and scales gathered, dequantised into the output -----------


def _fixed_dequantized(snap: Rows | None, name: str, field: Field, rows: np.ndarray, present: np.ndarray | None,
                       out: torch.Tensor) -> None:
    """The stored rows of a quantised fixed field into ``out`` (``present``: their positions; None: all)."""
    idx = rows if present is None else rows[present]
    if not len(idx):
        return
    src = _need(snap, idx, name)
    scheme = cast(Any, field.scheme)
    inner, row_bytes = _meta(field)[0], _meta(field)[1]
    block = max(1, _BOUNCE_BYTES // max(row_bytes, 1))
    codes_buf = np.empty((min(block, len(idx)), *inner), field.stored.numpy)
    scales_buf = np.empty(min(block, len(idx)), np.float32)
    tmp = None if present is None else torch.empty((min(block, len(idx)), *inner), dtype=out.dtype)
    for a in range(0, len(idx), block):
        part = idx[a : a + block]
        codes, scales = codes_buf[: len(part)], scales_buf[: len(part)]
        take_rows(src, lambda seg: seg.fixed(name), part, codes, row_bytes=row_bytes)
        take_rows(src, lambda seg: seg.scales(name), part, scales, row_bytes=4)
        if present is None:
            dequantize(codes, scales, scheme, out[a : a + len(part)])
        else:
            dest = cast(torch.Tensor, tmp)[: len(part)]
            out[torch.from_numpy(present[a : a + len(part)])] = dequantize(codes, scales, scheme, dest)


def _dequantized_elements(snap: Rows | None, s: int, name: str, field: Field, elements: np.ndarray,
                          dtype: torch.dtype) -> torch.Tensor:
    """Stored elements ``elements`` of segment ``s``'s quantised ragged field, dequantised into a new tensor."""
    seg = cast(Any, snap).segments[s]
    codes = np.take(seg.ragged(name)[0], elements, axis=0, mode="wrap")  # (elements were checked by _spans)
    scales = np.take(seg.scales(name), elements, mode="wrap")
    return dequantize(codes, scales, cast(Any, field.scheme), torch.empty(codes.shape, dtype=dtype))


def _row_dequantized(seg: Segment, local: int, name: str, field: Field) -> torch.Tensor:
    """Row ``local`` of a quantised field, dequantised into a new tensor of the field's dtype."""
    if field.ragged:
        values, offsets = seg.ragged(name)
        a, b = int(offsets[local]), int(offsets[local + 1])
        codes, scales = values[a:b], seg.scales(name)[a:b]
        return dequantize(codes, scales, cast(Any, field.scheme), torch.empty(codes.shape, dtype=field.spec.torch))
    codes, scales = seg.fixed(name)[local : local + 1], seg.scales(name)[local : local + 1]
    out = torch.empty(codes.shape, dtype=field.spec.torch)
    return dequantize(codes, scales, cast(Any, field.scheme), out)[0]


# -- what ActivationStore.gather and gather_padded check and call --------------------------


def field_names(fields: Mapping[str, Field], names: str | list[str] | None, where: str) -> list[str]:
    """The named fields (all when None), checked: KeyError listing the store's fields."""
    if names is None:
        return list(fields)
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise KeyError(f"fields {unknown} are not in the store {where}; it has {sorted(fields)}")
    return list(names)


def check_pad_multiple(pad_to_multiple_of: Any) -> None:
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                           not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")


def gather_fields(snap: Rows, fields: Mapping[str, Field], names: list[str], rows: np.ndarray,
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor | RaggedBatch]:
    """``store.gather``'s general path: each named field, fixed ones as a batch tensor, ragged ones back to back."""
    out: dict[str, torch.Tensor | RaggedBatch] = {}
    for name in names:
        f = fields[name]
        if f.ragged:
            rb = gather_ragged(snap, name, f, rows, dtype if f.quantize is not None else None)  # (rounded once)
            if dtype is not None and rb.values.is_floating_point() and rb.values.dtype != dtype:
                rb = RaggedBatch(rb.values.to(dtype), rb.offsets)
            out[name] = rb
        else:
            out[name] = gather_fixed(snap, name, f, rows, dtype=dtype)
    return out
