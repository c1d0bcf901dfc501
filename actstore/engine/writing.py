"""The writer's side of a store handle: append, views, attributes, commit and adopt.

:class:`WriterRole` is mixed into :class:`~actstore.store.ActivationStore`; it
keeps the rows appended since the last commit (one pending
:class:`~actstore.engine.segments.SegmentWriter`), the views and attributes to
record, and hands them to the one commit, :func:`actstore.engine.commit.commit`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.engine.commit import Change, Head, check_views, commit
from actstore.engine.compaction import CompactReport, TieredMerge, compact_snapshot
from actstore.engine.keyset import KeySet
from actstore.engine.reader import Snapshot, key_prefixes
from actstore.engine.segments import SegmentWriter
from actstore.engine.validate import validate_batch
from actstore.errors import CorruptStoreError, StaleStoreError, StoreError
from actstore.format.documents import check_name
from actstore.format.fields import Field
from actstore.format.layout import SEGMENTS_DIR
from actstore.format.manifest import Manifest, SegmentInfo
from actstore.storage.base import Backend, WriterLock
from actstore.storage.files import inside, object_files
from actstore.storage.local import link_object

__all__ = ["WriterRole", "describe_fields"]


def describe_fields(fields: Mapping[str, Field]) -> str:
    return ", ".join(f"{n}: {f.dtype}{list(f.shape)}" + (f" {f.quantize}-quantised" if f.quantize else "")
                     + (f" {f.compression}" if f.compression else "") for n, f in fields.items())


class WriterRole:
    """Writing methods of a store handle (see the module docstring); readers refuse them."""

    path: str
    _backend: Backend
    _lock: WriterLock | None
    _head: Head
    _snap: Snapshot
    _segment: SegmentWriter | None
    _pending_views: dict[str, np.ndarray]
    _pending_attrs: dict[str, Any] | None
    #: The automatic merge after each commit (:class:`~actstore.engine.compaction.TieredMerge`), or None for none.
    #: Set it on a writer: ``store.merge_policy = actstore.TieredMerge(fanout=8)``.
    merge_policy: TieredMerge | None = TieredMerge()

    if TYPE_CHECKING:
        @property
        def manifest(self) -> Manifest: ...
        @property
        def fields(self) -> Mapping[str, Field]: ...
        @property
        def attrs(self) -> Mapping[str, Any]: ...
        @property
        def fingerprint(self) -> str | None: ...
        @property
        def pending(self) -> int: ...
        def __len__(self) -> int: ...
        def _check_writable(self) -> None: ...
        def _load(self, manifest: Manifest) -> None: ...
        def _open_source(self, source: Any) -> Any: ...

    def set_view(self, name: str, rows: object) -> None:
        """Record (or replace) a named view of rows with the next commit.

        ``rows`` are committed row numbers, or -1 for "no row"; values outside
        ``[-1, len(store))`` are refused.
        """
        self._check_writable()
        try:
            check_name(name, "name")
        except StoreError as e:
            raise ValueError(str(e)) from None
        arr = np.asarray(rows)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"rows: expected a 1-D array of int rows, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        limit = len(self) + self.pending
        if arr.size and (arr.min() < -1 or arr.max() >= limit):
            raise ValueError(f"rows: values must lie in [-1, {limit}), got [{arr.min()}, {arr.max()}]")
        self._pending_views[name] = arr

    def update_attrs(self, attrs: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set (or replace) top-level attributes with the next commit; other attributes stay.

        ``store.update_attrs({"a": 1}, b=2)`` then ``store.commit()``.  Values must
        be JSON-serialisable.
        """
        self._check_writable()
        new = {**dict(attrs or {}), **more}
        try:
            json.dumps(new, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"attrs: must be JSON-serialisable ({e})") from e
        self._pending_attrs = {**(self._pending_attrs if self._pending_attrs is not None else dict(self.attrs)), **new}

    # -- writing --------------------------------------------------------------------
    def append(self, keys: object, values: Mapping[str, Any], *, allow_nonfinite: bool = True) -> int:
        """Buffer rows for the next commit; returns how many were new.

        Rows whose key is already stored (or already pending, or repeated in this
        batch) are skipped: keys are content addresses, so appending is
        idempotent.  The batch is validated whole before anything is written.

        Parameters
        ----------
        keys
            ``n`` 32-byte keys (a list of bytes or an ``(n, 32)`` uint8 array).
        values
            Field name → batch: ``(n, *shape)`` array-likes for fixed fields; a list
            of ``(length_i, *inner)`` arrays or a :class:`RaggedBatch` for ragged
            ones.  Values are cast to the field's dtype when that keeps their kind
            (int → float, float32 → float16); float → int, lossy integer narrowing
            and anything → bool are refused.
        allow_nonfinite
            NaN and ±inf are stored bit-exactly by default; ``False`` refuses a
            batch that holds any (after casting).

        Raises
        ------
        TypeError, ValueError
            Bad keys or values; the store is unchanged.
        """
        self._check_writable()
        karr, cols = validate_batch(self.fields, keys, values, allow_nonfinite=allow_nonfinite)
        new = self._new_rows(karr)
        if not new.any():
            return 0
        if not new.all():
            karr, cols = karr[new], _select(cols, new, self.fields)
        if self._segment is None:
            self._segment = SegmentWriter(self.path, self.fields, self.manifest.chunk_bytes)
        try:
            self._segment.write(karr, cols)
        except BaseException:
            # A half-written batch cannot be committed: drop the pending segment.
            self._segment.discard()
            self._segment = None
            raise
        return int(len(karr))

    def _new_rows(self, karr: np.ndarray) -> np.ndarray:
        new = self._snap.lookup(karr) < 0
        prefixes = key_prefixes(karr)
        sorted_prefixes = np.sort(prefixes)
        if len(karr) > 1 and bool((sorted_prefixes[1:] == sorted_prefixes[:-1]).any()):
            # Some prefixes repeat: keep the first occurrence of each whole key.
            _, first = np.unique(karr.view(np.dtype((np.void, 32))).ravel(), return_index=True)
            once = np.zeros(len(karr), bool)
            once[first] = True
            new &= once
        if self._segment is not None:
            new &= ~self._segment.keys_seen.contains(karr)
        return new

    def commit(self) -> int:
        """Make pending rows (and views, attributes) visible and durable; returns the new generation.

        When this returns, every file of the commit and the manifest are durable
        (fsynced; on object storage: uploaded, the manifest last).  With nothing
        pending it does nothing (on object storage it uploads a commit whose
        upload failed earlier).  The protocol: :mod:`actstore.engine.commit`.

        Raises
        ------
        StoreLockedError
            The lock was lost (an expired lease), or another writer changed the manifest.
        RemoteError
            The upload failed: the remote store still shows the previous commit,
            and the next ``commit()`` or ``close()`` uploads again.
        """
        self._check_writable()
        change = Change(segment=self._segment, views=self._pending_views, attrs=self._pending_attrs)
        check_views(self.manifest, change)
        self._segment, self._pending_views, self._pending_attrs = None, {}, None
        commit(self._backend, self._lock, self._head, self.manifest, change, self._load)
        self._merge_by_policy()
        return self.manifest.generation

    def compact(self) -> CompactReport:
        """Merge all segments into one, in one commit; returns what it did (a no-op for at most one segment).

        Pending rows, views and attributes are committed first.  The merged
        segment holds the same rows in the same order, so **row numbers do not
        change**: lookups, views and datasets built on the store stay right.
        The merged segment is written, hashed and fsynced, the manifest is
        replaced through the one commit, and the old segments' files are
        deleted only after that; readers of the older commit keep their maps
        and find rows they had not mapped yet in the merged segment.  Needs
        free space for one more copy of the rows.

        Raises
        ------
        StoreError
            Opened read-only (compaction takes the writer lock: ``open(path, mode="a")``,
            which raises :class:`~actstore.errors.StoreLockedError` naming the holder).
        OSError
            Writing failed (for example ENOSPC): the last commit is intact and the
            partial segment is deleted.
        """
        self._check_writable()
        if self._segment is not None or self._pending_views or self._pending_attrs is not None:
            self.commit()
        return compact_snapshot(self._backend, self._lock, self._head, self._snap, self._load)

    def _merge_by_policy(self) -> None:
        """After a commit: the merge :attr:`merge_policy` asks for, if any (its failure keeps the commit: a warning)."""
        if self.merge_policy is None:
            return
        span = self.merge_policy.plan([s.rows for s in self.manifest.segments])
        if span is None:
            return
        try:
            compact_snapshot(self._backend, self._lock, self._head, self._snap, self._load, [span])
        except (OSError, StoreError) as e:
            warnings.warn(f"{self.path}: the automatic merge of segments {span[0]}..{span[1] - 1} failed ({e}); "
                          "the commit stands, reads span more segments until a later merge or compact()",
                          RuntimeWarning, stacklevel=3)

    def adopt(self, sources: object, *, copy: bool = False) -> int:
        """Add the committed rows of other stores with the same fields, in one commit; returns the rows added.

        A source segment whose keys are all new here is added whole: its
        immutable files are hard-linked into this store (copied where links are
        impossible, or with ``copy=True``) — no row is rewritten and nothing is
        read but its keys.  A segment holding keys that this store (or an earlier
        source) already has contributes only its new rows, copied through
        :meth:`append`.  Segments this store already lists (a source made by
        cloning this store) are skipped.  The new rows follow this store's rows,
        source by source; sources' views are not adopted.  Used by distributed
        precompute to merge the ranks' part stores, and by :func:`actstore.remote.push`.

        Parameters
        ----------
        sources
            Stores or paths (one, or a list).  Each must have this store's fields
            and, when both record one, its fingerprint.

        Raises
        ------
        StoreError
            Rows are pending (commit or abort them first).
        ValueError, StaleStoreError
            A source with other fields, or another model's fingerprint.
        """
        self._check_writable()
        if self.pending or self._pending_views or self._pending_attrs is not None:
            raise StoreError(f"{self.path}: {self.pending} rows are pending; commit() or abort() them before adopt()")
        items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        opened = [self._open_source(s) for s in items]
        try:
            for src in opened:
                if dict(src.fields) != dict(self.fields):
                    raise ValueError(f"{src.path}: other fields ({describe_fields(src.fields)}) than {self.path} "
                                     f"({describe_fields(self.fields)}); only stores of the same fields can be adopted")
                if src.fingerprint is not None and self.fingerprint is not None and src.fingerprint != self.fingerprint:
                    raise StaleStoreError(f"{src.path}: computed by another model than {self.path}")
            try:
                linked = self._link_segments(opened, copy)  # copies rows it cannot link through append()
            except BaseException:
                self.abort()  # linked segments stay unreferenced: open(mode="a") deletes them
                raise
            change = Change(segment=self._segment, added=linked)
            self._segment = None
            if change.empty:
                if change.segment is not None:
                    change.segment.discard()
                return 0
            total = sum(i.rows for i, _ in linked) + (change.segment.rows if change.segment is not None else 0)
            commit(self._backend, self._lock, self._head, self.manifest, change, self._load)
            return total
        finally:
            for src, item in zip(opened, items, strict=True):
                if src is not item:
                    src.close()

    def abort(self) -> int:
        """Drop the pending rows (and views, attributes); returns how many rows were dropped."""
        self._check_writable()
        n = self.pending
        self._pending_views, self._pending_attrs = {}, None
        if self._segment is not None:
            self._segment.discard()
            self._segment = None
        return n

    def carry_views(self, src: Any) -> None:
        """Set each view of store ``src`` here too, mapped to this store's rows by key (with the next commit)."""
        for name in src.views:
            v = np.asarray(src.view(name))
            mapped = np.full(len(v), -1, np.int64)
            ok = v >= 0
            if ok.any():
                mapped[ok] = self._snap.lookup(src.key_at(v[ok]))
            self.set_view(name, mapped)

    def _link_segments(self, sources: list[Any], copy: bool) -> list[tuple[SegmentInfo, np.ndarray]]:
        """Hard-link (or copy) the sources' segments whose keys are all new; append the new rows of the others."""
        have = {s.id for s in self.manifest.segments}
        seen = KeySet()
        linked: list[tuple[SegmentInfo, np.ndarray]] = []
        for src in sources:
            for seg, start in zip(src.snapshot.segments, src.snapshot.starts_list, strict=False):
                if seg.info.id in have:
                    continue
                have.add(seg.info.id)
                keys = np.ascontiguousarray(seg.keys())
                new = self._snap.lookup(keys) < 0
                if len(seen):
                    new &= ~seen.contains(keys)
                seen.add(keys[new])
                if new.all():
                    _, files = object_files(seg.path, seg.info.meta, seg.path)
                    for rel, rec in files.items():
                        if os.stat(inside(seg.path, rel)).st_size != rec["size"]:
                            raise CorruptStoreError(f"{seg.path}/{rel}: size differs from its record")
                    link_object(seg.path, os.path.join(self.path, SEGMENTS_DIR, seg.info.id), files, copy=copy)
                    linked.append((seg.info, key_prefixes(keys)))
                elif new.any():
                    rows = start + np.flatnonzero(new)
                    # float32 reads of quantised fields re-quantise to the same codes (scales to within an ulp);
                    # other floating fields go through float32 and back exactly.
                    wide = torch.float32 if any(f.quantize for f in self.fields.values()) else None
                    for a in range(0, len(rows), 4096):
                        part = rows[a : a + 4096]
                        self.append(src.key_at(part), src.gather(part, dtype=wide))
        return linked


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
