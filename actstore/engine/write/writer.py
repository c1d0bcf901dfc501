"""The writer of a store handle opened with ``mode="a"``: append, views, attributes, commit, compact and adopt.

:class:`StoreWriter` is the writing half of :class:`~actstore.ActivationStore`
(whose public methods delegate to it, and carry the full documentation).  It
owns everything a writer holds between two commits: the backend and its writer
lock, the :class:`~actstore.engine.commit.Head` it publishes over, the pending
:class:`~actstore.engine.write.segments.SegmentWriter`, the views and attributes
to record, and the merge policy; it hands them to the one commit,
:func:`actstore.engine.commit.commit`.

It reads the handle's committed snapshot, which changes only through its own
commits (a writer never refreshes): the one callback it is given, ``show``,
maps a newly committed manifest for the handle and returns its snapshot, which
the writer keeps.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from actstore.engine.commit import Change, Head, check_views, commit, ids
from actstore.engine.lifecycle.compaction import (
    CompactReport,
    SourceSegment,
    TieredMerge,
    compact_snapshot,
    read_blocks,
)
from actstore.engine.lifecycle.reclaim import reclaim_snapshot
from actstore.engine.read.snapshot import SegmentReader, Snapshot, key_prefixes
from actstore.engine.write.keyset import KeySet
from actstore.engine.write.segments import PendingView, SegmentWriter
from actstore.engine.write.validate import validate_batch, view_of
from actstore.errors import CorruptStoreError, StaleStoreError, StoreError, StoreLockedError
from actstore.format.documents import name_argument
from actstore.format.fields import Field
from actstore.format.layout import SEGMENTS_DIR
from actstore.format.manifest import Manifest, SegmentInfo
from actstore.storage.base import Backend, WriterLock
from actstore.storage.checksum import check_file
from actstore.storage.files import inside, object_files
from actstore.storage.local import forked_message, link_object

__all__ = ["Source", "StoreWriter", "describe_fields", "view_of"]


def describe_fields(fields: Mapping[str, Field]) -> str:
    return ", ".join(f"{n}: {f.dtype}{list(f.shape)}" + (f" {f.quantize}-quantised" if f.quantize else "")
                     + (f" {f.compression}" if f.compression else "") for n, f in fields.items())


class Source(Protocol):
    """What :meth:`StoreWriter.adopt` and :meth:`StoreWriter.carry_views` read of another (open) store."""

    path: str

    @property
    def fields(self) -> Mapping[str, Field]: ...

    @property
    def fingerprint(self) -> str | None: ...

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def views(self) -> list[str]: ...

    def view(self, name: str) -> np.ndarray: ...

    def view_columns(self, name: str) -> Any: ...

    def key_at(self, rows: object) -> np.ndarray: ...

    def gather(self, rows: object, fields: Any = None, *, dtype: torch.dtype | None = None) -> Mapping[str, Any]: ...


class StoreWriter:
    """The writing state of one handle (see the module docstring); made by the handle, used through it.

    Parameters
    ----------
    backend, lock
        Where the store lives, and the writer lock this handle holds on it.
    head
        What the backend shows (updated by every publish).
    snap
        The handle's committed snapshot now.
    show
        Makes a committed manifest the handle's snapshot and returns that snapshot.
    """

    def __init__(self, backend: Backend, lock: WriterLock | None, head: Head, snap: Snapshot,
                 show: Callable[[Manifest], Snapshot]) -> None:
        self.backend = backend
        self.lock = lock
        self.head = head
        self.snap = snap
        self._show = show
        self.path = backend.root
        self.segment: SegmentWriter | None = None
        self.views: dict[str, PendingView] = {}
        self.attrs: dict[str, Any] | None = None
        #: The automatic merge after each commit, or None for none.
        self.merge_policy: TieredMerge | None = TieredMerge()
        #: Segments an automatic merge found damaged: never merged automatically again by this handle.
        self._damaged: set[str] = set()
        #: The process that opened the store for writing: the only one that may write through this handle.
        self.pid = os.getpid()

    @property
    def forked(self) -> bool:
        """True in a process other than the one that opened the store (a forked child): it may not write."""
        return os.getpid() != self.pid

    def check_process(self) -> None:
        """Refuse to write from a process that holds no lock (a child forked from the writer)."""
        if self.forked:
            raise StoreLockedError(forked_message(self.path, self.pid, os.getpid()))

    def _shown(self, manifest: Manifest) -> None:
        self.snap = self._show(manifest)

    @property
    def manifest(self) -> Manifest:
        return self.snap.manifest

    @property
    def fields(self) -> Mapping[str, Field]:
        return self.snap.manifest.fields

    @property
    def pending(self) -> int:
        """Rows appended since the last commit."""
        return self.segment.rows if self.segment is not None else 0

    @property
    def dirty(self) -> bool:
        """Something to commit: pending rows, views or attributes, or a commit whose upload failed.

        Never in a forked child: what it holds pending is its parent's, for the parent to commit."""
        return not self.forked and (self.segment is not None or bool(self.views) or self.attrs is not None
                or ids(self.head.manifest) != ids(self.manifest))

    # -- views and attributes ----------------------------------------------------------
    def set_view(self, name: str, rows: object, columns: Mapping[str, Any] | None = None,
                 fields: Mapping[str, Field] | None = None, item_key: object = None) -> None:
        """:meth:`ActivationStore.set_view`."""
        self.check_process()
        name_argument(name, "name")
        arr = np.asarray(rows)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"rows: expected a 1-D array of int rows, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        limit = self.snap.rows + self.pending
        if arr.size and (arr.min() < -1 or arr.max() >= limit):
            raise ValueError(f"rows: values must lie in [-1, {limit}), got [{arr.min()}, {arr.max()}]")
        self.views[name] = view_of(arr, columns or {}, fields or {}, item_key)
    def update_attrs(self, attrs: Mapping[str, Any] | None, more: Mapping[str, Any]) -> None:
        """:meth:`ActivationStore.update_attrs`."""
        self.check_process()
        new = {**dict(attrs or {}), **more}
        try:
            json.dumps(new, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"attrs: must be JSON-serialisable ({e})") from e
        self.attrs = {**(self.attrs if self.attrs is not None else dict(self.manifest.attrs)), **new}

    def carry_views(self, src: Source) -> None:
        """Set each view of store ``src`` here too, with its columns, mapped to this store's rows by key (with the
        next commit)."""
        for name in src.views:
            v = np.asarray(src.view(name))
            mapped = np.full(len(v), -1, np.int64)
            ok = v >= 0
            if ok.any():
                mapped[ok] = self.snap.lookup(src.key_at(v[ok]))
            cols = src.view_columns(name)
            if cols is None:
                self.set_view(name, mapped)
            else:
                self.set_view(name, mapped, {c: cols[c] for c in cols.fields}, dict(cols.fields), cols.item_key)

    # -- rows ------------------------------------------------------------------------
    def append(self, keys: object, values: Mapping[str, Any], allow_nonfinite: bool, allow_overflow: bool = False) -> int:
        """:meth:`ActivationStore.append`."""
        self.check_process()
        fields = self.fields
        karr, cols = validate_batch(fields, keys, values, allow_nonfinite=allow_nonfinite, allow_overflow=allow_overflow)
        new = self._new_rows(karr)
        if not new.any():
            return 0
        if not new.all():
            karr, cols = karr[new], _select(cols, new, fields)
        if self.segment is None:
            self.segment = SegmentWriter(self.path, fields, self.manifest.chunk_bytes)
        try:
            self.segment.write(karr, cols)
        except BaseException:
            # A half-written batch cannot be committed: drop the pending segment.
            self.segment.discard()
            self.segment = None
            raise
        return int(len(karr))

    def _new_rows(self, karr: np.ndarray) -> np.ndarray:
        new = self.snap.lookup(karr) < 0
        prefixes = key_prefixes(karr)
        sorted_prefixes = np.sort(prefixes)
        if len(karr) > 1 and bool((sorted_prefixes[1:] == sorted_prefixes[:-1]).any()):
            # Some prefixes repeat: keep the first occurrence of each whole key.
            _, first = np.unique(karr.view(np.dtype((np.void, 32))).ravel(), return_index=True)
            once = np.zeros(len(karr), bool)
            once[first] = True
            new &= once
        if self.segment is not None:
            new &= ~self.segment.keys_seen.contains(karr)
        return new

    def abort(self) -> int:
        """:meth:`ActivationStore.abort`."""
        self.check_process()
        n = self.pending
        self.views, self.attrs = {}, None
        if self.segment is not None:
            self.segment.discard()
            self.segment = None
        return n

    # -- commits ---------------------------------------------------------------------
    def commit(self) -> int:
        """:meth:`ActivationStore.commit`."""
        self.check_process()
        change = Change(segment=self.segment, views=self.views, attrs=self.attrs)
        check_views(self.manifest, change)
        self.segment, self.views, self.attrs = None, {}, None
        commit(self.backend, self.lock, self.head, self.manifest, change, self._shown)
        self._merge_by_policy()
        return self.manifest.generation

    def compact(self, drop: object = None) -> CompactReport:
        """:meth:`ActivationStore.compact`: pending rows, views and attributes are committed first.

        The merged segment is written, hashed and fsynced, the manifest is
        replaced through the one commit, and the old segments' files are
        deleted only after that; readers of the older commit keep their maps
        and find rows they had not mapped yet in the merged segment
        (:mod:`actstore.engine.lifecycle.compaction`).  With rows to ``drop``:
        :mod:`actstore.engine.lifecycle.reclaim` (rows renumbered).
        """
        self.check_process()
        rows = None if drop is None else np.unique(self.snap.check_rows(drop))  # (checked before any commit)
        if self.segment is not None or self.views or self.attrs is not None:
            self.commit()
        if rows is not None and rows.size:
            return reclaim_snapshot(self.backend, self.lock, self.head, self.snap, self._shown, rows)
        return compact_snapshot(self.backend, self.lock, self.head, self.snap, self._shown)

    def _merge_by_policy(self) -> None:
        """After a commit: the merge :attr:`merge_policy` asks for, if any (its failure keeps the commit: a warning).

        A range holding a damaged segment (:class:`CorruptStoreError`: a source
        file's bytes differ from its commit) is not merged again by this
        handle: its segments stay as they are for ``verify`` to report.
        """
        if self.merge_policy is None:
            return
        span = self.merge_policy.plan([s.rows for s in self.manifest.segments])
        if span is None:
            return
        ids = [s.id for s in self.manifest.segments[span[0] : span[1]]]
        if self._damaged.intersection(ids):
            return
        try:
            compact_snapshot(self.backend, self.lock, self.head, self.snap, self._shown, [span])
        except CorruptStoreError as e:
            self._damaged.update(ids)
            warnings.warn(f"{self.path}: the automatic merge of segments {span[0]}..{span[1] - 1} found damage and "
                          f"was not done ({e}); the commit stands and the segments are kept as they are — run "
                          "verify() to list every damaged file", RuntimeWarning, stacklevel=4)
        except (OSError, StoreError) as e:
            warnings.warn(f"{self.path}: the automatic merge of segments {span[0]}..{span[1] - 1} failed ({e}); "
                          "the commit stands, reads span more segments until a later merge or compact()",
                          RuntimeWarning, stacklevel=4)

    def check_nothing_pending(self, what: str) -> None:
        if self.pending or self.views or self.attrs is not None:
            raise StoreError(f"{self.path}: {self.pending} rows are pending; commit() or abort() them before {what}")

    def adopt(self, sources: Sequence[Source], copy: bool) -> int:
        """:meth:`ActivationStore.adopt`, of stores already open (the handle opens and closes paths).

        A source segment whose keys are all new here is added whole: its
        immutable files are hard-linked into this store (copied where links are
        impossible, or with ``copy``) — no row is rewritten and nothing is read
        but its keys.  A segment holding keys that this store (or an earlier
        source) already has contributes only its new rows, copied through
        :meth:`append`.  Segments this store already lists (a source made by
        cloning this store) are skipped.
        """
        self.check_process()
        self.check_nothing_pending("adopt()")
        fields = self.fields
        for src in sources:
            if dict(src.fields) != dict(fields):
                raise ValueError(f"{src.path}: other fields ({describe_fields(src.fields)}) than {self.path} "
                                 f"({describe_fields(fields)}); only stores of the same fields can be adopted")
            fp = self.manifest.fingerprint
            if src.fingerprint is not None and fp is not None and src.fingerprint != fp:
                raise StaleStoreError(f"{src.path}: computed by another model than {self.path}")
        try:
            linked = self._link_segments(sources, copy)  # copies rows it cannot link through append()
        except BaseException:
            self.abort()  # linked segments stay unreferenced: open(mode="a") deletes them
            raise
        change = Change(segment=self.segment, added=linked)
        self.segment = None
        if change.empty:
            if change.segment is not None:
                change.segment.discard()
            return 0
        total = sum(i.rows for i, _ in linked) + (change.segment.rows if change.segment is not None else 0)
        commit(self.backend, self.lock, self.head, self.manifest, change, self._shown)
        return total

    def _link_segments(self, sources: Sequence[Source], copy: bool) -> list[tuple[SegmentInfo, np.ndarray]]:
        """Hard-link (or copy) the sources' segments whose keys are all new; append the new rows of the others."""
        have = {s.id for s in self.manifest.segments}
        seen = KeySet()
        linked: list[tuple[SegmentInfo, np.ndarray]] = []
        for src in sources:
            for seg in src.snapshot.segments:
                if seg.info.id in have:
                    continue
                have.add(seg.info.id)
                keys = np.ascontiguousarray(seg.keys())
                new = self.snap.lookup(keys) < 0
                if len(seen):
                    new &= ~seen.contains(keys)
                seen.add(keys[new])
                if new.all():  # every byte that goes into this store matches its commit
                    link_object(seg.path, os.path.join(self.path, SEGMENTS_DIR, seg.info.id), _checked_files(seg),
                                copy=copy)
                    linked.append((seg.info, key_prefixes(keys)))
                elif new.any():
                    self._append_rows_of(seg, new)
        return linked

    def _append_rows_of(self, seg: SegmentReader, new: np.ndarray) -> None:
        """Append the rows ``new`` selects of source segment ``seg`` as stored (a quantised field's codes and scales
        too), read from its files, each checked against its commit before this returns."""
        if self.segment is None:
            self.segment = SegmentWriter(self.path, self.fields, self.manifest.chunk_bytes)
        src = SourceSegment(seg, self.fields)
        try:
            for a, keys, cols, _ in read_blocks(seg, src, self.fields):
                keep = new[a : a + len(keys)]
                if keep.any():
                    self.segment.write(np.ascontiguousarray(keys[keep]), _select(cols, keep, self.fields))
            src.finish()
        finally:
            src.close()

    # -- the lock --------------------------------------------------------------------
    def release(self) -> None:
        """Release the writer lock (the handle is closing)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finalize(self) -> None:
        """From a finaliser: only let go of the lock, never commit or talk to a server."""
        if self.lock is not None:
            self.lock.finalize()


def _checked_files(seg: Any) -> dict[str, dict[str, Any]]:
    """The file records of a source segment, after checking every file against them (size and BLAKE3).

    Raises :class:`CorruptStoreError` naming the segment and the file; reads each file once.
    """
    _, files = object_files(seg.path, seg.info.meta, f"segment {seg.info.id} ({seg.path})")
    for rel, rec in sorted(files.items()):
        check_file(inside(seg.path, rel), rec, f"segment {seg.info.id}: file {rel} ({seg.path}/{rel})")
    return files


def _select(cols: dict[str, Any], keep: np.ndarray, fields: Mapping[str, Field]) -> dict[str, Any]:
    """The columns (storage form, as :func:`validate_batch` returns them) of the rows ``keep`` selects."""
    out: dict[str, Any] = {}
    for name, f in fields.items():
        col = cols[name]
        if f.ragged:
            values, lengths = col
            elements = np.repeat(keep, lengths)  # each stored element kept with its row
            out[name] = (values[elements], lengths[keep])
            if f.quantize is not None:
                out[name + "/scales"] = cols[name + "/scales"][elements]
        else:
            out[name] = col[keep]
            if f.quantize is not None:
                out[name + "/scales"] = cols[name + "/scales"][keep]
    return out
