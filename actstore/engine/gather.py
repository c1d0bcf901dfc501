"""Gathers: copy rows of a snapshot's fields into new tensors, once.

The read side's one copy.  :func:`gather_fixed` for fixed-size fields and
:func:`gather_padded` for ragged ones (right-padded, with mask and lengths);
:func:`row_view` for one row without a copy.  Rows are grouped by segment with
:func:`split_by_segment`.  Used by :class:`~actstore.store.ActivationStore` and
the training side alike.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actstore.engine.ragged import PaddedBatch
from actstore.engine.reader import SegmentReader, Snapshot, as_tensor
from actstore.errors import MissingRowsError
from actstore.format.manifest import Field

__all__ = ["alloc", "check_float_dtype", "gather_fixed", "gather_padded", "row_view", "split_by_segment"]

#: Rows gathered at a time when a cast needs a bounce buffer (kept cache-sized).
_BOUNCE_BYTES = 256 << 10


# -- allocation and gathers ---------------------------------------------------------


def alloc(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (as default_collate does)."""
    numel = math.prod(shape)
    if not shared or numel == 0:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(numel, device="cpu")
    return elem.new(storage).resize_(shape)


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


def split_by_segment(snap: Snapshot, rows: np.ndarray) -> list[tuple[int, np.ndarray | None, np.ndarray]]:
    """Group rows by segment: ``[(segment, positions in rows or None for all, local rows)]``.

    Like ``Snapshot.split`` but cheap when a batch falls in one segment, the
    usual case with chunk-local sampling (two bisections, no sort).
    """
    starts = snap._starts_list
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


def gather_fixed(
    snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gather a fixed-size field into a new ``(n, *shape)`` tensor.  Always copies, once.

    ``rows`` are committed rows (already range-checked) or -1 for positions taken
    from ``extra`` (position → row tensor).  Floating fields are cast to ``dtype``
    on the way; a cast, or rows spread over several segments, go through a
    cache-sized bounce buffer, so memory still sees one copy.  ``shared``
    allocates the result in shared memory.
    """
    out = alloc((len(rows), *_meta(field)[0]), _out_dtype(field, dtype), shared)
    present = _present(rows)
    if present is None:
        if len(rows):
            _take_into(snap, name, field, rows, out, None)
    else:
        if len(present):
            _take_into(snap, name, field, rows[present], out, present)
        for p in np.flatnonzero(rows < 0).tolist():
            out[p].copy_(extra[p] if extra is not None else _no_extra(p))
    return out


def row_view(seg: SegmentReader, local: int, name: str, field: Field) -> torch.Tensor:
    """Row ``local`` of a segment's field as a tensor.  Never copies (a compressed field: decoded, a copy)."""
    if field.ragged:
        values, offsets = seg.ragged(name)
        return as_tensor(values[offsets[local] : offsets[local + 1]], field)
    return as_tensor(seg.fixed(name)[local, ...], field)  # [i, ...] keeps a 0-d view


def _no_extra(p: int) -> torch.Tensor:
    raise MissingRowsError(f"batch position {p} has no row in the store and nothing computed for it")


def _take_into(snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, out: torch.Tensor,
               outpos: np.ndarray | None) -> None:
    if snap is None:
        raise MissingRowsError(f"no store to read {len(rows)} rows of {name!r} from")
    tgt = _np_target(out, field)
    block = max(1, _BOUNCE_BYTES // max(_meta(field)[1], 1))
    for s, pos, local in split_by_segment(snap, rows):
        src = snap.segments[s].fixed(name)
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
            else:
                out[torch.from_numpy(dest[a : a + block])] = as_tensor(part, field).to(out.dtype)


def gather_padded(
    snap: Snapshot | None, name: str, field: Field, rows: np.ndarray, *, dtype: torch.dtype | None = None,
    pad_to_multiple_of: int | None = None, pad_value: float = 0, mask_dtype: torch.dtype = torch.bool,
    shared: bool = False, extra: Mapping[int, torch.Tensor] | None = None,
) -> PaddedBatch:
    """Gather a ragged field into a right-padded batch with its mask and lengths.  Always copies, once.

    Each row is copied from the map straight into its slot of the padded output
    (cast on the way), and only the padding is filled: every output byte is
    written once.  ``rows``/``extra``/``shared`` as in :func:`gather_fixed`.
    """
    n = len(rows)
    starts = np.zeros(n, np.int64)
    lengths = np.zeros(n, np.int64)
    seg_of = np.full(n, -1, np.int64)
    present = _present(rows)
    idx = rows if present is None else rows[present]
    if len(idx):
        if snap is None:
            raise MissingRowsError(f"no store to read {len(idx)} rows of {name!r} from")
        for s, pos, local in split_by_segment(snap, idx):
            p = (slice(None) if pos is None else pos) if present is None else (present if pos is None else present[pos])
            offsets = snap.segments[s].ragged(name)[1]
            starts[p] = offsets[local]
            lengths[p] = offsets[local + 1] - offsets[local]
            seg_of[p] = s
    for p in np.flatnonzero(rows < 0).tolist():
        lengths[p] = len(extra[p]) if extra is not None else len(_no_extra(p))
    width = int(lengths.max()) if n else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = alloc((n, width, *_meta(field)[0]), _out_dtype(field, dtype), shared)
    tgt = _np_target(out, field)
    pad = tgt if tgt is not None else out
    sources: dict[int, Any] = {}
    for i, (s, a, ln) in enumerate(zip(seg_of.tolist(), starts.tolist(), lengths.tolist(), strict=True)):
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
    lens = alloc((n,), torch.int64, shared)
    lens.copy_(torch.from_numpy(lengths))
    mask = alloc((n, width), mask_dtype, shared)
    torch.lt(torch.arange(width)[None, :], lens[:, None], out=mask) if mask_dtype == torch.bool else \
        mask.copy_(torch.arange(width)[None, :] < lens[:, None])
    return PaddedBatch(out, mask, lens)
