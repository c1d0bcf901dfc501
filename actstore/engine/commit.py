"""The commit protocol: the one place a manifest is published.

A store changes only by *adding* immutable segments and then atomically
replacing the manifest (the root ``zarr.json``).  The steps of one commit:

1. The pending segment's shard files are finished (padding, shard index,
   CRC32C), flushed and fsynced.
2. Each array's ``zarr.json`` and the segment's ``zarr.json`` (which records the
   size and BLAKE3 of every file in the segment) are written and fsynced, and so
   are the directories that hold them.
3. A key-index run for the new rows is written the same way (and, when runs pile
   up, all runs are merged into one); so is each view set since the last commit
   (with its columns, :func:`~actstore.engine.write.segments.write_view`).
   A compaction's merged segments are finished here too; each replaces a
   contiguous range of segments holding the same rows in the same order, so
   global row numbers, the key index and views stay valid unchanged.  A
   compaction that drops rows (:class:`Reclaim`) is the one exception: its one
   segment replaces every segment, and the key index and every view are
   rewritten for the new row numbers in the same commit (the manifest's
   ``renumbered`` count goes up by one).
4. The new manifest — naming the segment by id and the BLAKE3 of its
   ``zarr.json`` — is published through the store's backend over the manifest
   this writer started from: in a local directory it is written to a temporary
   file, fsynced, renamed over ``zarr.json`` and the store directory is
   fsynced; on object storage the new objects are uploaded first and the
   manifest last, with ``If-Match`` on its predecessor.  **This is the commit
   point.**
5. Index runs, views and (after a compaction) segments the new manifest no
   longer names are deleted (readers that mapped them keep their maps; a
   reader's segment that was not mapped yet is found in the merged segment
   holding its rows, :meth:`actstore.engine.read.snapshot.Snapshot.relocate`).

A crash before step 4 leaves the old manifest in place, and the next writer
deletes the unreferenced files.  Readers only ever follow the manifest, so they
never see a half-written segment.  Only one writer may work at a time (the
backend's lock).  Everything that changes a store — :meth:`commit`, ``adopt``,
``update_attrs``, ``create``, ``clone_store``, ``push`` — goes through
:func:`commit` or :func:`publish` here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from actstore.engine.read.snapshot import Snapshot
from actstore.engine.write.segments import PendingView, SegmentWriter, write_index_run, write_view
from actstore.errors import CorruptStoreError, StoreError
from actstore.format.layout import INDEXES_DIR
from actstore.format.manifest import IndexRunInfo, Manifest, SegmentInfo, ViewInfo, parse_root, root_document
from actstore.storage.base import Backend, WriterLock, objects_of
from actstore.storage.scratch import ScratchArray

__all__ = ["MAX_INDEX_RUNS", "Change", "Head", "Reclaim", "check_views", "commit", "ids", "merge_runs", "publish"]

log = logging.getLogger("actstore")

#: Merge the key index into one run when a commit would leave more than this many.
MAX_INDEX_RUNS = 8
_MERGE_CHUNK = 1 << 20  # index entries placed at a time by a merge


@dataclass
class Head:
    """What the backend shows, as far as this writer knows: the last published manifest and its version token.

    Behind the handle's own snapshot only on object storage, after a failed
    upload (the commit is staged locally and published again later).
    """

    manifest: Manifest | None
    token: str | None


@dataclass
class Reclaim:
    """A compaction that drops rows: ``writer`` holds every other row, in order, and replaces every segment.

    ``new_row[r]`` is old row ``r``'s number after it (-1: dropped); ``prefixes``
    the kept rows' key prefixes in their new order; ``views`` every view of the
    store with its rows renumbered (and its columns, as they were); ``values``
    the ragged value counts the segment must hold.
    """

    writer: SegmentWriter
    new_row: np.ndarray
    prefixes: np.ndarray
    views: Mapping[str, PendingView]
    values: Mapping[str, int]


@dataclass
class Change:
    """What one commit adds."""

    #: The pending segment, finished in step 1.
    segment: SegmentWriter | None = None
    #: Segments already complete under the backend's root (adopted by hard links), with their key prefixes.
    added: list[tuple[SegmentInfo, np.ndarray]] = field(default_factory=list)
    #: View name -> its rows (and columns), to record (or replace).
    views: Mapping[str, PendingView] = field(default_factory=dict)
    #: New attributes (all of them), or None to keep them.
    attrs: Mapping[str, Any] | None = None
    #: Compaction: ``(lo, hi, writer)``, a segment holding the rows of current segments ``lo .. hi-1``, in order.
    merged: Sequence[tuple[int, int, SegmentWriter]] = ()
    #: A compaction that drops rows (alone in its change).
    reclaim: Reclaim | None = None

    @property
    def empty(self) -> bool:
        return (self.segment is None or self.segment.rows == 0) and not self.added and not self.views \
            and self.attrs is None and not self.merged and self.reclaim is None

    def writers(self) -> list[SegmentWriter]:
        """The segments this change writes (discarded when it fails before its commit point)."""
        return ([self.segment] if self.segment is not None else []) + [w for _, _, w in self.merged] + \
            ([self.reclaim.writer] if self.reclaim is not None else [])


def ids(m: Manifest | None) -> tuple[Any, ...]:
    """What identifies a commit: its generation and the ids of everything it references."""
    if m is None:
        return ()
    return (m.generation, [s.id for s in m.segments], [r.id for r in m.indexes],
            sorted((k, v.id) for k, v in m.views.items()))


def commit(backend: Backend, lock: WriterLock | None, head: Head, current: Manifest, change: Change,
           show: Callable[[Manifest], None]) -> Manifest:
    """Commit ``change`` on top of ``current`` (the handle's snapshot); returns the new manifest.

    ``show`` makes a manifest the handle's snapshot; it is called with the new
    one once it is published (or staged, on object storage), before superseded
    objects are deleted.  With nothing to add, only a commit staged earlier is
    published.  On failure nothing the backend shows is lost: the new segment
    is deleted unless the manifest that names it became visible (then it is
    shown, and the error still raised: its durability is unknown).
    """
    if lock is not None:
        lock.check()  # a lost lease: never publish
    if change.empty:
        if ids(head.manifest) != ids(current):
            publish(backend, head, current)
        return current
    manifest = current
    prepared = False
    try:
        manifest, discarded = _next_manifest(backend.root, current, change)  # steps 1-3
        prepared = True
        publish(backend, head, manifest, show, discarded)  # steps 4-5
    except BaseException:
        _after_failure(backend, head, current, manifest, change.writers(), show, prepared)
        raise
    return manifest


def check_views(current: Manifest, change: Change) -> None:
    """Refuse views naming rows this commit will not hold (before anything is written)."""
    rows_after = current.rows + (change.segment.rows if change.segment is not None else 0) + \
        sum(i.rows for i, _ in change.added)
    for name, view in change.views.items():  # pending rows it named may have been dropped by a failed append
        rows = view.rows
        if rows.size and int(rows.max()) >= rows_after:
            raise ValueError(
                f"view {name!r} names row {int(rows.max())}, but this commit holds only {rows_after} rows "
                "(pending rows were dropped by a failed append?); call set_view again")


def _next_manifest(root: str, current: Manifest, change: Change) -> tuple[Manifest, list[str]]:
    """The next manifest, and the objects written or named before that it no longer needs (merged runs)."""
    if change.reclaim is not None:
        if change.segment is not None or change.added or change.views or change.attrs is not None or change.merged:
            raise ValueError("a compaction that drops rows commits alone (commit pending rows first)")
        return _reclaimed(root, current, change.reclaim), []
    added = list(change.added)
    discarded: list[str] = []
    if change.segment is not None and change.segment.rows:
        added.append(change.segment.finish())
    manifest = current
    if change.merged:
        manifest = replace(manifest, segments=_merged_segments(current, change.merged))
    if added:
        prefixes = added[0][1] if len(added) == 1 else np.concatenate([p for _, p in added])
        run = write_index_run(root, prefixes, first_row=current.rows)
        manifest = replace(manifest, segments=(*manifest.segments, *(i for i, _ in added)),
                           indexes=(*manifest.indexes, run))
        if len(manifest.indexes) > MAX_INDEX_RUNS:
            discarded = [f"{INDEXES_DIR}/{r.id}" for r in manifest.indexes]
            manifest = replace(manifest, indexes=(merge_runs(root, manifest),))
    if change.views:
        views: dict[str, ViewInfo] = dict(manifest.views)
        for name, view in change.views.items():
            views[name] = write_view(root, view)
        manifest = replace(manifest, views=views)
    if change.attrs is not None:
        manifest = replace(manifest, attrs=dict(change.attrs))
    return replace(manifest, generation=current.generation + 1), discarded


def _merged_segments(current: Manifest, merged: Sequence[tuple[int, int, SegmentWriter]]) -> tuple[SegmentInfo, ...]:
    """``current``'s segments with each merged range replaced by its one segment (checked to hold the same rows)."""
    segments = list(current.segments)
    last = len(segments)
    for lo, hi, writer in sorted(merged, key=lambda m: m[0], reverse=True):  # back to front: indices stay valid
        if not 0 <= lo < hi <= last:
            raise ValueError(f"merged segments {lo}..{hi - 1}: not a range of the {len(segments)} segments, "
                             "or overlapping another merged range")
        last = lo
        info, _ = writer.finish()
        old = segments[lo:hi]
        values = {n: sum(s.values[n] for s in old) for n in info.values}
        if info.rows != sum(s.rows for s in old) or values != dict(info.values):
            raise StoreError(f"merged segment {info.id}: holds {info.rows} rows {info.values}, not the "
                             f"{sum(s.rows for s in old)} rows {values} of the segments it replaces")
        segments[lo:hi] = [info]
    return tuple(segments)


def _reclaimed(root: str, current: Manifest, r: Reclaim) -> Manifest:
    """The manifest after a compaction that drops rows: one segment, one index run, every view renumbered."""
    kept = int((r.new_row >= 0).sum())
    if len(r.new_row) != current.rows or len(r.prefixes) != kept or r.writer.rows != kept:
        raise StoreError(f"reclaiming compaction: {r.writer.rows} rows written and {len(r.prefixes)} keys for the "
                         f"{kept} kept of {len(r.new_row)} rows numbered, in a store of {current.rows} rows")
    segments: tuple[SegmentInfo, ...] = ()
    indexes: tuple[IndexRunInfo, ...] = ()
    if kept:
        info, _ = r.writer.finish()
        if dict(info.values) != dict(r.values):
            raise StoreError(f"merged segment {info.id}: holds ragged values {info.values}, not {dict(r.values)}")
        segments, indexes = (info,), (write_index_run(root, r.prefixes),)
    else:
        r.writer.discard()
    if set(r.views) != set(current.views):
        raise ValueError(f"reclaiming compaction: views {sorted(r.views)} renumbered, the store has "
                         f"{sorted(current.views)}")
    views = {name: write_view(root, view) for name, view in r.views.items()}
    return replace(current, segments=segments, indexes=indexes, views=views, renumbered=current.renumbered + 1,
                   generation=current.generation + 1)


def merge_runs(root: str, manifest: Manifest) -> IndexRunInfo:
    """One key-index run holding every entry of the manifest's runs.

    The runs are sorted already: they are merged two at a time, stably (equal
    prefixes keep the runs' order, FORMAT.md §6), a chunk at a time, into scratch
    files under ``root`` (:class:`~actstore.storage.scratch.ScratchArray`: page
    cache), so a merge holds a few MB of anonymous memory whatever the store's
    size.  A run found out of order raises :class:`CorruptStoreError`.
    """
    snap = Snapshot(root, manifest)
    prefix, row = snap.runs[0].prefix, snap.runs[0].row
    for run in snap.runs[1:]:
        prefix, row = _merge_two(root, prefix, row, run.prefix, run.row)
    if len(snap.runs) == 1:
        _check_sorted(prefix)
    return write_index_run(root, prefix, row)


def _check_sorted(prefix: np.ndarray) -> None:
    for a in range(0, len(prefix), _MERGE_CHUNK):
        part = prefix[max(a - 1, 0) : a + _MERGE_CHUNK]
        if bool((part[1:] < part[:-1]).any()):
            raise CorruptStoreError("a key-index run is not sorted by prefix (FORMAT.md §6); run verify()")


def _merge_two(root: str, ap: np.ndarray, ar: np.ndarray, bp: np.ndarray,
               br: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stable merge of two sorted runs (``a``'s entries first among equal prefixes), in scratch files."""
    _check_sorted(ap)
    _check_sorted(bp)
    n = len(ap) + len(bp)
    prefix = ScratchArray(np.uint64, (), root, capacity=n).data[:n]
    row = ScratchArray(np.int64, (), root, capacity=n).data[:n]
    for src_p, src_r, other, side in ((ap, ar, bp, "left"), (bp, br, ap, "right")):
        for a in range(0, len(src_p), _MERGE_CHUNK):
            part = src_p[a : a + _MERGE_CHUNK]
            at = np.searchsorted(other, part, side=side)  # type: ignore[call-overload]
            at += np.arange(a, a + len(part), dtype=np.int64)
            prefix[at] = part
            row[at] = src_r[a : a + _MERGE_CHUNK]
    return prefix, row


def publish(backend: Backend, head: Head, manifest: Manifest, show: Callable[[Manifest], None] | None = None,
            discarded: Sequence[str] = ()) -> None:
    """Steps 4 and 5: publish ``manifest`` over ``head`` (updated), show it, then delete what it superseded.

    Superseded: the objects of the previously published manifest that
    ``manifest`` does not name, and ``discarded`` (written for this commit, then
    merged away).
    """
    before = set(objects_of(head.manifest)) if head.manifest is not None else set()
    now = objects_of(manifest)
    head.token = backend.publish(root_document(manifest), head.token, [o for o in now if o not in before])
    head.manifest = manifest
    if show is not None:
        show(manifest)
    for obj in sorted((before | set(discarded)) - set(now)):  # readers that mapped them earlier keep their maps
        sub, _, name = obj.partition("/")
        try:
            backend.delete_object(sub, name)
        except OSError as e:
            log.warning("%s: could not delete superseded %s (%s)", backend.url, obj, e)


def _after_failure(backend: Backend, head: Head, current: Manifest, manifest: Manifest, segs: list[SegmentWriter],
                   show: Callable[[Manifest], None], prepared: bool) -> None:
    """Keep whatever the backend shows; discard the failed commit's segment otherwise.

    An error after the rename (in the directory fsync, or an interrupt) leaves
    the new manifest visible: its files must stay, and the handle shows it
    (durability is then unknown, which the caller learns from the error).  On
    object storage a failed upload leaves the commit staged: the handle shows
    it and the next commit or close publishes it.
    """
    try:
        data, token = backend.read_manifest()
        on_disk: Manifest | None = parse_root(data, f"{backend.url}/zarr.json")
    except (StoreError, OSError):
        on_disk, token = None, None  # unknown: delete nothing; the next open(mode="a") cleans up
    if manifest is not current and on_disk is not None and ids(on_disk) == ids(manifest):
        head.manifest, head.token = manifest, token  # the publish happened
        show(manifest)
    elif prepared and backend.stages:
        show(manifest)
    else:
        for seg in segs:
            if on_disk is None:
                seg.close_files()  # keep them: the manifest on disk is unknown
            else:
                seg.discard()
