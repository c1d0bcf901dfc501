"""Compaction: merge runs of adjacent segments into one, through the one commit.

A store written in many commits has many segments; every gather that spans
them pays per segment.  Compaction copies the rows of a contiguous range of
segments, in order, into one new segment (written, hashed and fsynced like any
other), then publishes a manifest that names the new segment in place of the
range (:func:`actstore.engine.commit.commit`, ``Change.merged``) and deletes the
superseded files after that commit point.  Because the merged segment holds
the same rows in the same order at the same place, **global row numbers do not
change**: the key index, views (dataset position → row), ``CachedDataset`` and
any row number a program kept stay valid.  Readers of an older commit keep
the maps they hold and find rows of segments they had not mapped yet in the
merged segment (:meth:`actstore.engine.read.snapshot.Snapshot.relocate`).

:class:`TieredMerge` is the writer's automatic policy (as in log-structured
stores): segments are put in size tiers, a factor ``fanout`` apart, and
whenever the newest ``fanout`` segments share a tier they are merged into one
segment of the next tier.  Each row is then rewritten at most once per tier,
``log_fanout(rows / min_rows)`` times in all, and a store keeps at most
``fanout - 1`` segments per tier when its commits are of similar size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actstore.engine.commit import Change, Head, commit
from actstore.engine.read.plans import plain
from actstore.engine.read.snapshot import SegmentReader, Snapshot
from actstore.engine.write.segments import SegmentWriter
from actstore.errors import CorruptStoreError
from actstore.format.arrays import chunk_path
from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.fields import Field
from actstore.format.layout import field_arrays
from actstore.format.manifest import KEY_BYTES, Manifest
from actstore.storage.base import Backend, WriterLock
from actstore.storage.checksum import CheckedFile
from actstore.storage.files import inside, object_files

__all__ = ["COPY_BYTES", "CompactReport", "SourceSegment", "TieredMerge", "compact_snapshot", "merge_range",
           "read_blocks"]

log = logging.getLogger("actstore")

#: Rows are copied into the merged segment in blocks of about this many bytes.
COPY_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class TieredMerge:
    """The writer's automatic merge policy: a tiered merge of the newest segments.

    Parameters
    ----------
    fanout
        Segments per tier before they merge (≥ 2).  A gather touches at most
        ``fanout - 1`` segments per tier.
    min_rows
        Segments of fewer rows than this all count as the lowest tier.

    A segment of ``r`` rows is in tier ``floor(log_fanout(max(r, min_rows) / min_rows))``.
    After each commit the writer merges the newest ``fanout`` segments while
    they share one tier; the merged segment lands in a higher tier and may
    cascade.  Only the newest segments are merged, so a merge never rewrites
    rows that are already in a larger segment.
    """

    fanout: int = 16
    min_rows: int = 1

    def __post_init__(self) -> None:
        for name, value, least in (("fanout", self.fanout, 2), ("min_rows", self.min_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"TieredMerge: {name} must be an int >= {least}, got {value!r}")

    def tier(self, rows: int) -> int:
        """The size tier of a segment of ``rows`` rows (see the class docstring)."""
        t, bound = 0, self.min_rows * self.fanout
        while bound <= rows:
            t, bound = t + 1, bound * self.fanout
        return t

    def plan(self, rows: Sequence[int]) -> tuple[int, int] | None:
        """The range ``(lo, hi)`` of segments (of these sizes) to merge now, cascades included; None: no merge."""
        spans = [(i, i + 1, r) for i, r in enumerate(rows)]  # (first segment, end, rows)
        merged = False
        while len(spans) >= self.fanout:
            tail = spans[-self.fanout :]
            t = self.tier(tail[-1][2])
            if any(self.tier(r) != t for _, _, r in tail):
                break
            spans[-self.fanout :] = [(tail[0][0], tail[-1][1], sum(r for _, _, r in tail))]
            merged = True
        return (spans[-1][0], spans[-1][1]) if merged else None


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What a compaction did: segments before and after, rows and bytes copied (0 for a no-op)."""

    segments_before: int
    segments_after: int
    rows_copied: int
    bytes_copied: int
    generation: int

    @property
    def noop(self) -> bool:
        return self.segments_before == self.segments_after

    def __str__(self) -> str:
        if self.noop:
            return (f"nothing to compact: {self.segments_before} segment"
                    f"{'' if self.segments_before == 1 else 's'} (a store with at most one segment is compact)")
        return (f"merged {self.segments_before} segments into {self.segments_after} "
                f"({self.rows_copied:,} rows, {self.bytes_copied:,} bytes copied); generation {self.generation}")


class SourceSegment:
    """The files of one committed segment, read for a copy and checked against its commit in the same pass.

    Its ``zarr.json`` is checked against the manifest first (which makes its
    file records trustworthy).  Every file it lists is then a
    :class:`~actstore.storage.checksum.CheckedFile`: the raw data arrays a copy
    reads row range by row range (keys, uncompressed values, scales) are
    hashed as they are copied and finished by :meth:`finish`; every other
    file (metadata, ragged offsets, compressed data) is checked whole here,
    before anything reads it.  The arrays it hands out are views of read-only
    maps of the files (the bytes on disk, never a private page this process
    wrote to).  A mismatch raises :class:`CorruptStoreError` naming the segment
    and the file; the caller then publishes nothing.
    """

    def __init__(self, seg: SegmentReader, fields: Mapping[str, Field]) -> None:
        self.seg = seg
        self.files: dict[str, CheckedFile] = {}
        where = f"segment {seg.info.id} ({seg.path})"
        if seg.provide is not None:  # (a remote store: its zarr.json, then its files, into the chunk cache)
            seg.provide(seg.path, seg.info.meta, ["keys/zarr.json"])
        _, records = object_files(seg.path, seg.info.meta, where)
        if seg.provide is not None:
            seg.provide(seg.path, seg.info.meta, sorted(records))
        data = {f"keys/{chunk_path(2)}": "keys"}
        for name, f in fields.items():
            for a in field_arrays(name, f):
                if a.codec is None and not a.key.endswith("/offsets"):
                    data[f"{a.rel}/{chunk_path(len(a.inner) + 1)}"] = a.key
        self.streamed: dict[str, CheckedFile] = {}
        try:
            for rel, rec in sorted(records.items()):
                checked = CheckedFile(inside(seg.path, rel), rec, f"segment {seg.info.id}: file {rel} ({seg.path}/{rel})")
                self.files[rel] = checked
                if rel in data:
                    self.streamed[data[rel]] = checked
                else:
                    checked.finish()  # small, or read by a decoder: checked before it is used
        except BaseException:
            self.close()
            raise
        self.fields = fields

    def array(self, key: str, rel: str, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """Rows of array ``rel`` (a read-only view of its checked file's map)."""
        name = f"{rel}/{chunk_path(len(inner) + 1)}"
        if rows == 0:
            return np.empty((0, *inner), dtype)
        f = self.files.get(name)
        if f is None:
            raise CorruptStoreError(f"segment {self.seg.info.id}: file {name} is not listed in its zarr.json "
                                    f"({self.seg.path})")
        return f.array(dtype, (rows, *inner))

    def finish(self) -> None:
        """Check the streamed files (hashing what the copy skipped); raise on the first mismatch."""
        for f in self.files.values():
            f.finish()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _copy_segment(seg: SegmentReader, out: SegmentWriter, fields: Any) -> int:
    """Append every row of ``seg`` to ``out``, from its checked files; returns bytes written.

    Every file of ``seg`` is checked against its recorded BLAKE3 in the same
    pass (:class:`SourceSegment`): a damaged file raises :class:`CorruptStoreError`
    before this returns, and nothing is published.  Plain fields (raw values,
    :func:`~actstore.engine.read.plans.plain`) go whole, each array as one
    file-range copy (:meth:`SegmentWriter.write` with ``maps=True``); a segment
    with any other field is copied in blocks of :data:`COPY_BYTES`, compressed
    fields decoded and encoded again.
    """
    src = SourceSegment(seg, fields)
    try:
        copied = _copy_rows(seg, src, out, fields)
        src.finish()
    finally:
        src.close()
    return copied


def _copy_rows(seg: SegmentReader, src: SourceSegment, out: SegmentWriter, fields: Any) -> int:
    rows = seg.info.rows
    before = out.rows
    whole = all(plain(f) for f in fields.values())
    size = 0
    for _, keys, cols, row_bytes in read_blocks(seg, src, fields, whole=whole):
        out.write(keys, cols, maps=whole, sources=src.streamed)
        size = rows * row_bytes
    if out.rows - before != rows:
        raise AssertionError(f"{seg.path}: copied {out.rows - before} of its {rows} rows")
    return size


def read_blocks(seg: SegmentReader, src: SourceSegment, fields: Mapping[str, Field], *, whole: bool = False,
                ) -> Iterator[tuple[int, np.ndarray, dict[str, Any], int]]:
    """The rows of ``seg`` in storage form, from its checked files: ``(first row, keys, columns, row bytes)`` per block.

    Columns are what :meth:`SegmentWriter.write` takes (a ragged field's ``(values,
    lengths)``, a quantised field's codes and ``name + "/scales"`` as stored: never
    re-quantised), views of the checked maps (compressed arrays decoded).  Blocks
    hold about :data:`COPY_BYTES` (``whole``: one block).  Never copies, except
    decoding.  The caller finishes ``src`` before it publishes anything.
    """
    rows = seg.info.rows
    row_bytes = 32 + sum(f.row_bytes for f in fields.values())  # (stored bytes: a quantised field's codes)
    ragged: dict[str, tuple[Any, np.ndarray]] = {}
    arrays: dict[str, Any] = {}
    for name, f in fields.items():
        specs = {a.key: a for a in field_arrays(name, f)}
        count = seg.info.values.get(name, 0) if f.ragged else rows
        v = specs[name]
        # (a compressed array is checked whole already; its decoder reads the checked file)
        arrays[name] = (src.array(name, v.rel, count, v.inner, v.numpy) if v.codec is None
                        else seg.ragged(name)[0] if f.ragged else seg.fixed(name))
        if f.ragged:
            o = specs[name + "/offsets"]
            offsets = src.array(o.key, o.rel, rows + 1, (), o.numpy)
            if offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0):
                raise CorruptStoreError(f"segment {seg.info.id}: {o.rel}: offsets are not non-decreasing from 0 to "
                                        f"{count} ({seg.path})")
            ragged[name] = (arrays[name], offsets)
        if f.quantize is not None:
            sc = specs[name + "/scales"]
            arrays[sc.key] = src.array(sc.key, sc.rel, count, (), sc.numpy)
    if ragged:  # a block also holds each row's values: size blocks by the average row
        row_bytes += sum(int(fields[n].row_bytes * (int(o[-1]) / max(rows, 1))) for n, (_, o) in ragged.items())
    keys = src.array("keys", "keys", rows, (KEY_BYTES,), INTERNAL_DTYPES["uint8"])
    block = max(rows, 1) if whole else max(1, COPY_BYTES // max(row_bytes, 1))
    for a in range(0, rows, block):
        b = min(rows, a + block)
        cols: dict[str, Any] = {}
        for name, f in fields.items():
            if f.ragged:
                values, offsets = ragged[name]
                lo, hi = int(offsets[a]), int(offsets[b])
                cols[name] = (_rows(values, lo, hi), np.diff(offsets[a : b + 1]))
            else:
                lo, hi = a, b
                cols[name] = _rows(arrays[name], a, b)
            if f.quantize is not None:  # codes and scales copied as stored: never re-quantised
                cols[name + "/scales"] = arrays[name + "/scales"][lo:hi]
        yield a, keys[a:b], cols, row_bytes


def _rows(array: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start .. stop-1`` of a checked map (a view) or of compressed rows (decoded)."""
    return array[start:stop] if isinstance(array, np.ndarray) else array.rows(start, stop)


def merge_range(root: str, snap: Snapshot, lo: int, hi: int) -> tuple[SegmentWriter, int]:
    """Write one segment holding the rows of ``snap``'s segments ``lo .. hi-1`` in order (not yet finished).

    Returns the writer (its :meth:`~SegmentWriter.finish` is step 1 of the commit)
    and the bytes copied.  On failure the partial segment is deleted.
    """
    out = SegmentWriter(root, snap.fields, snap.manifest.chunk_bytes)
    copied = 0
    try:
        for seg in snap.segments[lo:hi]:
            copied += _copy_segment(seg, out, snap.fields)
    except BaseException:
        out.discard()
        raise
    return out, copied


def compact_snapshot(backend: Backend, lock: WriterLock | None, head: Head, snap: Snapshot,
                     show: Callable[[Manifest], None], ranges: Sequence[tuple[int, int]] | None = None) -> CompactReport:
    """Merge segment ranges of ``snap`` (default: all segments into one) and commit; a no-op for ≤ 1 segment.

    ``ranges`` are ``(lo, hi)`` pairs of segment indices, disjoint, each of at
    least two segments.  The caller holds the writer lock and has nothing pending.
    """
    n = len(snap.segments)
    todo = [(0, n)] if ranges is None else [r for r in ranges if r[1] - r[0] >= 2]
    if n <= 1 or not todo:
        return CompactReport(n, n, 0, 0, snap.manifest.generation)
    merged: list[tuple[int, int, SegmentWriter]] = []
    copied = rows = 0
    try:
        for lo, hi in todo:
            writer, nbytes = merge_range(backend.root, snap, lo, hi)
            merged.append((lo, hi, writer))
            copied += nbytes
            rows += writer.rows
    except BaseException:
        for _, _, w in merged:
            w.discard()
        raise
    manifest = commit(backend, lock, head, snap.manifest, Change(merged=merged), show)
    log.info("%s: merged %d segments into %d", backend.url, n, len(manifest.segments))
    return CompactReport(n, len(manifest.segments), rows, copied, manifest.generation)
