"""Reclaiming compaction: merge every segment into one, dropping given rows, through the one commit.

A precompute rerun after its items or their preprocessing changed computes new
rows, and its ``dataset`` view stops referencing the old ones; without this, a
store grows with every such rerun.  :func:`reclaim_snapshot` copies every row
*not* dropped, in order, into one new segment (written, hashed and fsynced like
any other) and commits it with :class:`actstore.engine.commit.Reclaim`: the
new manifest names that segment in place of all of them, one key-index run for
the kept rows and every view rewritten with the new row numbers (row ``r``
becomes ``r`` minus the dropped rows before it), all in one commit.  Nothing
changes until that manifest is published; a crash or an error before leaves
the store as it was (the partial segment is deleted, or the next writer deletes
it).

Unlike a plain compaction this **renumbers rows**: the manifest's
``renumbered`` count goes up, and a reader of an older commit that meets a
segment deleted by it refuses to read on (its row numbers mean other rows now)
instead of relocating.  Rows that a view references are never dropped (the call
raises): the caller decides which rows are garbage (precompute:
:mod:`actstore.precompute.run`).  Every kept row is rewritten once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore.engine.commit import Change, Head, Reclaim, commit
from actstore.engine.lifecycle.compaction import COPY_BYTES, CompactReport, SourceSegment
from actstore.engine.read.maps import map_view
from actstore.engine.read.snapshot import SegmentReader, Snapshot, key_prefixes
from actstore.engine.read.views import ViewColumns
from actstore.engine.write.segments import PendingView, SegmentWriter
from actstore.engine.write.validate import view_of
from actstore.format.fields import Field
from actstore.format.manifest import Manifest
from actstore.storage.base import Backend, WriterLock

__all__ = ["ReclaimReport", "reclaim_snapshot", "unreferenced_rows"]

log = logging.getLogger("actstore")


@dataclass(frozen=True, slots=True)
class ReclaimReport(CompactReport):
    """A compaction that dropped rows: :class:`CompactReport` and the rows dropped (rows were renumbered)."""

    rows_dropped: int = 0

    @property
    def noop(self) -> bool:
        return self.rows_dropped == 0 and self.segments_before == self.segments_after

    def __str__(self) -> str:
        return (f"merged {self.segments_before} segments into {self.segments_after}, dropping "
                f"{self.rows_dropped:,} rows ({self.rows_copied:,} rows, {self.bytes_copied:,} bytes copied; rows "
                f"renumbered, views and key index rewritten); generation {self.generation}")


def views_of(snap: Snapshot) -> dict[str, np.ndarray]:
    """Every view of the snapshot's commit, mapped (never copies)."""
    return {name: map_view(snap.root, info, snap.check, snap.provide) for name, info in snap.manifest.views.items()}


def unreferenced_rows(snap: Snapshot) -> np.ndarray:
    """The rows (sorted) that no view of the snapshot's commit references."""
    seen = np.zeros(snap.rows, bool)
    for rows in views_of(snap).values():
        seen[rows[rows >= 0]] = True
    return np.flatnonzero(~seen)


def _copy_kept(seg: SegmentReader, out: SegmentWriter, fields: Any, keep: np.ndarray) -> tuple[int, np.ndarray]:
    """Append the rows of ``seg`` that ``keep`` marks to ``out``; returns (bytes written, their key prefixes).

    Block by block (about :data:`COPY_BYTES`), from the maps; compressed fields
    are decoded and encoded again, quantised fields' codes and scales copied as
    stored (never re-quantised).
    """
    rows = seg.info.rows
    row_bytes = 32 + sum(f.row_bytes for f in fields.values())
    ragged = {n: seg.ragged(n) for n, f in fields.items() if f.ragged}
    if ragged:
        row_bytes += sum(int(fields[n].row_bytes * (int(o[-1]) / max(rows, 1))) for n, (_, o) in ragged.items())
    keys = seg.keys()
    block = max(1, COPY_BYTES // max(row_bytes, 1))
    copied, prefixes = 0, []
    for a in range(0, rows, block):
        b = min(rows, a + block)
        mask = keep[a:b]
        if not mask.any():
            continue
        cols: dict[str, Any] = {}
        for name, f in fields.items():
            if f.ragged:
                values, offsets = ragged[name]
                lo, hi = int(offsets[a]), int(offsets[b])
                lengths = np.diff(offsets[a : b + 1])
                sel = np.repeat(mask, lengths)  # each element with its row
                cols[name] = (np.ascontiguousarray(_rows(values, lo, hi)[sel]), lengths[mask])
            else:
                lo, hi, sel = a, b, mask
                cols[name] = np.ascontiguousarray(_rows(seg.fixed(name), a, b)[mask])
            if f.quantize is not None:
                cols[name + "/scales"] = np.ascontiguousarray(seg.scales(name)[lo:hi][sel])
        kept = np.ascontiguousarray(keys[a:b][mask])
        out.write(kept, cols)
        prefixes.append(key_prefixes(kept))
        copied += int(mask.sum()) * row_bytes
    return copied, np.concatenate(prefixes) if prefixes else np.empty(0, np.uint64)


def _rows(array: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start .. stop-1`` of a map (a view) or of compressed rows (decoded)."""
    return array[start:stop] if isinstance(array, np.ndarray) else array.rows(start, stop)


def renumber_views(views: Mapping[str, np.ndarray], keep: np.ndarray, new_row: np.ndarray) -> dict[str, np.ndarray]:
    """Each view with its rows renumbered; raises ``ValueError`` if a view references a dropped row."""
    out: dict[str, np.ndarray] = {}
    for name, rows in views.items():
        present = rows >= 0
        safe = np.where(present, rows, 0)
        lost = present & ~keep[safe]
        if lost.any():
            pos = int(np.flatnonzero(lost)[0])
            raise ValueError(f"drop: row {int(rows[pos])} is referenced by view {name!r} (at position {pos}) and "
                             f"{int(lost.sum())} more of its rows are dropped too; only rows no view references "
                             "can be dropped (set the view without them first)")
        out[name] = np.where(present, new_row[safe], -1).astype(np.int64)
    return out


def with_columns(snap: Snapshot, views: Mapping[str, np.ndarray]) -> dict[str, PendingView]:
    """Each renumbered view as a view to write, with the columns and item keys it has now (positions do not move)."""
    out: dict[str, PendingView] = {}
    for name, rows in views.items():
        info = snap.manifest.views[name]
        if not info.has_columns:
            out[name] = PendingView(rows)
            continue
        cols = ViewColumns(snap.root, name, info, snap.check, snap.provide)
        out[name] = view_of(rows, {c: cols[c] for c in cols.fields}, dict(cols.fields), cols.item_key)
    return out


def check_source(seg: SegmentReader, fields: Mapping[str, Field]) -> None:
    """Check every file of a source segment against the BLAKE3 its commit recorded (``CorruptStoreError`` naming
    the segment and file): a reclaiming copy reads rows selectively, so it checks whole files first."""
    src = SourceSegment(seg, fields)
    try:
        src.finish()
    finally:
        src.close()


def reclaim_snapshot(backend: Backend, lock: WriterLock | None, head: Head, snap: Snapshot,
                     show: Callable[[Manifest], None], drop: np.ndarray) -> ReclaimReport:
    """Merge every segment of ``snap`` into one without the rows ``drop`` (checked row numbers), and commit.

    The caller holds the writer lock and has nothing pending.  Raises
    ``ValueError`` (before writing anything) if a view references a dropped row.
    """
    keep = np.ones(snap.rows, bool)
    keep[drop] = False
    new_row = np.cumsum(keep, dtype=np.int64) - 1
    new_row[~keep] = -1
    views = with_columns(snap, renumber_views(views_of(snap), keep, new_row))
    out = SegmentWriter(backend.root, snap.fields, snap.manifest.chunk_bytes)
    copied, parts = 0, []
    values = {n: 0 for n, f in snap.fields.items() if f.ragged}
    try:
        for seg, start in zip(snap.segments, snap.starts_list, strict=False):  # (starts has one more)
            mask = keep[start : start + seg.info.rows]
            if mask.any():
                check_source(seg, snap.fields)  # every file against its commit before a byte of it is copied
            for name in values:
                offsets = seg.ragged(name)[1]
                values[name] += int(np.diff(offsets)[mask].sum())
            if mask.any():
                nbytes, prefixes = _copy_kept(seg, out, snap.fields, mask)
                copied += nbytes
                parts.append(prefixes)
    except BaseException:
        out.discard()
        raise
    prefixes = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    n = len(snap.segments)
    change = Change(reclaim=Reclaim(out, new_row, prefixes, views, values))
    manifest = commit(backend, lock, head, snap.manifest, change, show)
    dropped = int((~keep).sum())
    log.info("%s: merged %d segments into %d, dropping %d rows", backend.url, n, len(manifest.segments), dropped)
    return ReclaimReport(n, len(manifest.segments), int(keep.sum()), copied, manifest.generation, dropped)
