"""The store handle, :class:`ActivationStore`, over a :class:`~actstore.storage.base.Backend` (local or remote).

It holds the committed :class:`~actstore.engine.read.snapshot.Snapshot` it reads
(with its views) and, opened with ``mode="a"``, a
:class:`~actstore.engine.write.writer.StoreWriter` that owns the writer's state;
every change goes through :mod:`actstore.engine.commit`.  Opening: :mod:`actstore.store.api`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from actstore.engine.commit import Head
from actstore.engine.lifecycle.compaction import CompactReport, TieredMerge
from actstore.engine.lifecycle.info import describe_store
from actstore.engine.lifecycle.opening import backend_to_open, load_snapshot, open_parts, read_head
from actstore.engine.lifecycle.verify import VerifyReport, verify_snapshot
from actstore.engine.read.gather import check_float_dtype, check_pad_multiple, field_names, gather_fields, gather_padded
from actstore.engine.read.maps import ReadCheck
from actstore.engine.read.plans import ROW_ALL, fast_gather, make_row, row_getter, row_many, row_one, row_plan
from actstore.engine.read.prefetch import forget_on_evict, prefetch
from actstore.engine.read.ragged import PaddedBatch, RaggedBatch
from actstore.engine.read.snapshot import Snapshot, normalize_keys
from actstore.engine.write.writer import StoreWriter, describe_fields
from actstore.errors import StoreError
from actstore.format.fields import Field
from actstore.format.manifest import Manifest, parse_manifest
from actstore.storage.backends import backend_from_state
from actstore.storage.base import Backend, RemoteState, WriterLock
from actstore.storage.chunkcache import ChunkCache
from actstore.storage.objects import ObjectStore
from actstore.store.views import StoreViews

__all__ = ["ActivationStore", "open_in"]

#: What a reader's :attr:`ActivationStore.merge_policy` shows (the policy a writer starts with).
_DEFAULT_MERGE = TieredMerge()
_from_numpy = torch.from_numpy


def open_in(backend: Backend, mode: str = "r", *, fingerprint: str | None = None,
            verify_reads: bool = False) -> ActivationStore:
    """:func:`open` on a given backend.  Closes the backend if it fails."""
    try:
        manifest, token, lock = open_parts(backend, mode, fingerprint)
    except BaseException:
        backend.close()
        raise
    try:
        return ActivationStore(backend, manifest, mode=mode, lock=lock, verify_reads=verify_reads, token=token)
    except BaseException:
        if lock is not None:
            lock.release()
        backend.close()
        raise

class ActivationStore(StoreViews):
    """An activation store: rows of named fields, one row per distinct sample key.

    Obtain one with :func:`actstore.create` or :func:`actstore.open`.  A store
    opened for reading shows the snapshot of the last commit before it was
    opened (call :meth:`refresh` to see newer ones); a store opened with
    ``mode="a"`` also takes :meth:`append` and :meth:`commit`.

    Reads return ``torch.Tensor`` views of private copy-on-write memory maps:
    no copy is made, PyTorch sees a writable tensor, and writes to it never
    reach the file (see :func:`actstore.engine.read.maps.map_rows` for the lifetime rules).
    The same class serves stores on object storage: their files are mapped from
    the local chunk cache (``path``; ``url`` is the remote store), and
    :meth:`prefetch` warms that cache.
    """

    def __init__(self, backend: Backend, manifest: Manifest, *, mode: str, lock: WriterLock | None = None,
                 verify_reads: bool = False, token: str | None = None) -> None:
        self._backend = backend
        self.path = backend.root
        self.mode = mode
        self._closed = False
        self._check = ReadCheck() if verify_reads else None
        self._provide = backend.provider()
        self._head = Head(manifest, token)
        self._load(manifest)
        #: The writer's state (append mode only); the writing methods delegate to it.
        self._writer = StoreWriter(backend, lock, self._head, self._snap, self._load) if mode == "a" else None
        backend.on_evict(forget_on_evict(self))  # evicted cache files: drop this handle's maps of them

    def _load(self, manifest: Manifest) -> Snapshot:
        """Make ``manifest`` this handle's snapshot (returned), its index runs and views mapped now."""
        self._snap, self._views, self._columns = load_snapshot(self._backend, manifest, self._check, self._provide,
                                                retry=self.mode != "a")
        return self._snap

    # -- metadata -----------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The committed snapshot this handle reads, for the read path's own layers (training and precompute
        gather through it).  It changes on :meth:`refresh` and :meth:`commit`: hold the store, not the snapshot."""
        self._check_open()
        return self._snap

    @property
    def manifest(self) -> Manifest:
        """The manifest of the snapshot this handle reads (the last commit it saw; not copied)."""
        return self._snap.manifest

    @property
    def fields(self) -> Mapping[str, Field]:
        """The store's fields by name, as the snapshot's manifest records them (not copied)."""
        return self._snap.manifest.fields

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the frozen part that wrote the store (``actstore.fingerprint``), or None."""
        return self._snap.manifest.fingerprint

    @property
    def attrs(self) -> Mapping[str, Any]:
        """The user attributes of the snapshot (read-only; change them with ``update_attrs``)."""
        return self._snap.manifest.attrs

    @property
    def generation(self) -> int:
        """Number of commits so far; grows by one with each commit."""
        return self._snap.manifest.generation

    def __len__(self) -> int:
        """Committed rows (pending rows of a writer are not counted)."""
        return self._snap.rows

    @property
    def pending(self) -> int:
        """Rows appended but not yet committed."""
        return self._writer.pending if self._writer is not None else 0

    @property
    def backend(self) -> Backend:
        """Where the store lives (:class:`~actstore.storage.base.Backend`)."""
        return self._backend

    # -- object storage only: the backend's RemoteState (AttributeError for a local store) ----
    def _remote(self, member: str) -> RemoteState:
        remote = self._backend.remote
        if remote is None:
            raise AttributeError(f"{self.path}: a local store has no {member!r} (stores on object storage only)")
        return remote

    @property
    def url(self) -> str:
        """The URL of a store on object storage (``path`` is then its local mirror)."""
        return self._remote("url").url

    @property
    def cache(self) -> ChunkCache:
        """The local :class:`~actstore.storage.chunkcache.ChunkCache` of a store on object storage."""
        return self._remote("cache").cache

    @property
    def objects(self) -> ObjectStore:
        """The object-storage client of a store on object storage."""
        return self._remote("objects").objects

    def __repr__(self) -> str:
        fields = describe_fields(self.fields)
        return f"ActivationStore({self._backend.url!r}, mode={self.mode!r}, rows={len(self)}, fields={{{fields}}})"

    def refresh(self) -> bool:
        """Read the manifest again; True if a newer commit became visible (readers).

        A writer holds the lock: its own commits are the newest, and this returns False.
        """
        self._check_open()
        if self.mode == "a":
            return False
        manifest, token = read_head(self._backend)
        if manifest.generation == self.generation:
            return False
        self._load(manifest)
        self._head = Head(manifest, token)
        return True

    # -- keys ---------------------------------------------------------------------
    def lookup(self, keys: object) -> np.ndarray:
        """Row of each key (int64), or -1 for keys not in the last commit."""
        self._check_open()
        return self._snap.lookup(normalize_keys(keys))

    def __contains__(self, key: object) -> bool:
        return bool(self.lookup(key)[0] >= 0) if isinstance(key, (bytes, bytearray, memoryview)) else False

    def key_at(self, rows: object) -> np.ndarray:
        """The keys of ``rows`` as an (n, 32) uint8 array.  Always copies."""
        self._check_open()
        return self._snap.gather_keys(self._snap.check_rows(rows))

    # -- rows ---------------------------------------------------------------------
    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        """One row as ``{field: tensor}``.  Never copies: the tensors are views of the maps
        (except compressed fields, which are decoded into a private copy)."""
        one = self._snap.row1  # a one-segment store of one plain fixed field: its map, inlined (store[i]'s whole cost)
        if one is not None and type(row) is int:
            arr, name, cls = one
            out = cls()  # (dict, or a Row carrying the snapshot's aliases: dict's own constructor either way)
            try:
                out[name] = _from_numpy(arr[row])  # (the map holds exactly the store's rows: numpy checks the range)
            except IndexError:
                raise IndexError(f"row {row} is out of range for a store of {len(arr)} rows") from None
            return out
        return self._row(row)

    def _row(self, row: int) -> dict[str, torch.Tensor]:
        """``store[row]`` in general (and the first call, which builds the snapshot's plans)."""
        many = self._snap.rowk  # several segments of one plain fixed field: the segment by bisection, inlined
        if many is not None and type(row) is int:
            starts, maps, name, cls, n = many
            at = row + n if row < 0 else row
            s = bisect_right(starts, at) - 1  # (a row outside the store: -1 or len(starts) - 1, an empty map)
            out = cls()
            try:
                out[name] = _from_numpy(maps[s][at - starts[s]])
            except IndexError:
                raise IndexError(f"row {row} is out of range for a store of {n} rows") from None
            return out
        if self._closed:
            self._check_open()
        if type(row) is not int:
            if not isinstance(row, (int, np.integer)) or isinstance(row, bool):
                raise TypeError(f"row: expected an int, got {type(row).__name__}; use gather() for many rows")
            row = int(row)
        snap = self._snap
        get = snap.plans.get("getitem", False)
        if get is False:
            get = snap.plans["getitem"] = row_getter(snap)
            snap.row1 = row_one(snap)
            snap.rowk = row_many(snap)
        if get is not None:
            return get(row)  # type: ignore[no-any-return]
        seg, local = snap.locate(row)
        return make_row(seg.plans.get(ROW_ALL) or row_plan(seg), local, snap.aliases)

    def get(self, key: bytes) -> dict[str, torch.Tensor]:
        """The row stored under ``key``, as ``store[row]`` (views).  Raises ``KeyError`` if absent."""
        row = int(self.lookup(key)[0])
        if row < 0:
            raise KeyError(f"key {bytes(key).hex()[:16]}… is not in the store")
        return self[row]

    def gather(self, rows: object, fields: str | list[str] | None = None, *,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | RaggedBatch]:
        """Many rows at once: one batch tensor per fixed field, a :class:`RaggedBatch` per ragged one.

        Always copies, once per row (into a new batch tensor).  ``dtype`` casts
        floating fields on the way (for example ``torch.float32`` for a head
        that trains in float32; a cast of a fixed field still copies each row
        once); integer and bool fields keep their dtype.  For a ragged field as
        a padded batch with its mask, see :meth:`gather_padded`.
        """
        if fields is None and dtype is None and not self._closed:
            fast = fast_gather(self._snap, rows)  # plain fixed fields: straight from the maps (engine/read/plans.py)
            if fast is not None:
                return fast  # type: ignore[return-value]
        self._check_open()
        check_float_dtype(dtype)
        idx = self._snap.check_rows(rows)
        return gather_fields(self._snap, self.fields, field_names(self.fields, fields, self.path), idx, dtype)

    def gather_padded(self, rows: object, field: str, *, dtype: torch.dtype | None = None,
                      pad_to_multiple_of: int | None = None, pad_value: float = 0) -> PaddedBatch:
        """A ragged field's rows as a right-padded batch: ``(values, mask, lengths)``.

        ``values`` is ``(n, L, *inner)`` with ``L`` the longest row (rounded up to
        ``pad_to_multiple_of``), ``mask`` ``(n, L)`` bool, ``lengths`` ``(n,)``.
        Every row is copied once, from the map straight into its slot (cast to
        ``dtype`` on the way for floating fields); only the padding is filled.
        """
        self._check_open()
        check_float_dtype(dtype)
        name = field_names(self.fields, field, self.path)[0]
        f = self.fields[name]
        if not f.ragged:
            raise ValueError(f"gather_padded: field {name!r} is not ragged (shape {f.shape}); use gather()")
        check_pad_multiple(pad_to_multiple_of)
        return gather_padded(self._snap, name, f, self._snap.check_rows(rows), dtype=dtype,
                             pad_to_multiple_of=pad_to_multiple_of, pad_value=pad_value)

    def iter_rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order, as ``store[row]`` gives them (views)."""
        self._check_open()
        for seg in self._snap.segments:
            plan = seg.plans.get(ROW_ALL) or row_plan(seg)
            for local in range(seg.info.rows):
                yield make_row(plan, local, self._snap.aliases)

    # -- integrity -------------------------------------------------------------------
    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Check every byte of the snapshot against its checksums, and its structure; returns a ``VerifyReport``.

        On object storage every file is downloaded again (into the cache; with
        ``cache_dir=False`` into a temporary directory) and checked there.
        Raises :class:`CorruptStoreError` naming each damaged or missing file.
        """
        self._check_open()
        return verify_snapshot(self._backend, self.manifest, progress=progress)

    def info(self) -> dict[str, Any]:
        """A summary: rows, fields, bytes on disk (on object storage: in the bucket), fingerprint, layout."""
        self._check_open()
        return describe_store(self.manifest, self._backend)

    def prefetch(self, rows: Any = None, fields: list[str] | str | None = None, *, keys: bool = False) -> Any:
        """Download, in background threads, the files that reading ``rows`` will need (object storage).

        Segment files are fetched in the order the rows first touch them (pass an
        epoch's sampler order to warm the cache).  With ``cache_bytes`` set, it
        stops once it has queued 80% of it.  ``rows=None``: the whole store.
        Returns a ``Prefetch`` (``wait()``, ``done()``, ``cancel()``); for a
        local store it has nothing to do.
        """
        self._check_open()
        return prefetch(self, rows, field_names(self.fields, fields, self.path), keys)

    # -- writing (mode "a": delegated to the StoreWriter) ------------------------------
    @property
    def merge_policy(self) -> TieredMerge | None:
        """The automatic merge after each commit, or None: ``store.merge_policy = actstore.TieredMerge(fanout=8)``."""
        return self._writer.merge_policy if self._writer is not None else _DEFAULT_MERGE

    @merge_policy.setter
    def merge_policy(self, policy: TieredMerge | None) -> None:
        if self._writer is not None:
            self._writer.merge_policy = policy

    def _writable(self) -> StoreWriter:
        self._check_open()
        if self._writer is None:
            raise StoreError(f"{self.path}: opened read-only; use actstore.open(path, mode='a') to append")
        return self._writer

    def append(self, keys: object, values: Mapping[str, Any], *, allow_nonfinite: bool = True,
               allow_overflow: bool = False) -> int:
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
        allow_overflow
            Store finite values that the cast would make ±inf (1e5 into float16) clamped
            to the dtype's largest value (±65504), not raise :class:`~actstore.CastOverflowError`.

        Raises ``TypeError`` or ``ValueError`` for bad keys or values; the store is then unchanged.
        """
        return self._writable().append(keys, values, allow_nonfinite, allow_overflow)

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
        return self._writable().commit()

    def abort(self) -> int:
        """Drop the pending rows (and views, attributes); returns how many rows were dropped."""
        return self._writable().abort()

    def update_attrs(self, attrs: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set (or replace) top-level attributes with the next commit; other attributes stay.

        ``store.update_attrs({"a": 1}, b=2)`` then ``store.commit()``.  Values must
        be JSON-serialisable.
        """
        self._writable().update_attrs(attrs, more)

    def compact(self, *, drop: object = None) -> CompactReport:
        """Merge all segments into one, in one commit; returns what it did (a no-op for at most one segment).

        Pending rows, views and attributes are committed first.  The merged segment holds the same rows
        in the same order, so **row numbers do not change**; readers of the older commit keep working.
        Needs free space for one more copy of the rows.  How: :meth:`StoreWriter.compact`.
        ``drop`` (row numbers) leaves those rows out, even of one segment, and **renumbers the rows** in
        that commit (views and key index rewritten; row numbers kept from before are void).  Rows a view
        references cannot be dropped (``ValueError``).  Raises ``StoreError`` when opened read-only (the
        writer lock); ``OSError`` when writing failed (ENOSPC, say): the last commit is intact.
        """
        return self._writable().compact(drop)

    def adopt(self, sources: object, *, copy: bool = False) -> int:
        """Add the committed rows of other stores with the same fields, in one commit; returns the rows added.

        Segments whose keys are all new are hard-linked (or, with ``copy=True``
        or where links are impossible, copied) whole, no row rewritten; other
        segments contribute their new rows through :meth:`append`
        (:meth:`StoreWriter.adopt`).  The new rows follow this store's rows,
        source by source; sources' views are not adopted.  Used to merge
        distributed precompute's part stores, and by :func:`actstore.store.push`.

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
        writer = self._writable()
        writer.check_nothing_pending("adopt()")  # before any source is opened
        items: list[Any] = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        opened = [s if isinstance(s, ActivationStore) else open_in(backend_to_open(s)) for s in items]
        try:
            return writer.adopt(opened, copy)
        finally:
            for src, item in zip(opened, items, strict=True):
                if src is not item:
                    src.close()

    # -- closing -----------------------------------------------------------------------
    def close(self) -> None:
        """Commit pending rows (writers), release the lock and drop this handle's maps.

        Tensors already returned stay valid: each holds its own reference to the map.
        """
        if self._closed:
            return
        try:
            if self._writer is not None and self._writer.dirty:
                self.commit()  # (also publishes a commit whose upload failed earlier)
        finally:
            self._closed = True
            self._snap.row1 = self._snap.rowk = None  # store[i] takes the general path, which says it is closed
            if self._writer is not None:
                self._writer.release()
            self._backend.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never commit (or talk to a server) from a finaliser: only let go of the lock.
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.finalize()

    def _field_names(self, fields: str | list[str] | None) -> list[str]:
        return field_names(self.fields, fields, self.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")

    # -- pickling (DataLoader workers) -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self.mode != "r":
            raise TypeError(f"{self.path}: a store open for appending cannot be sent to another process; "
                            "open it with mode='r' there")
        # The snapshot travels with the handle: a worker reads the same commit.
        return {"backend": self._backend.state(), "manifest": self.manifest.to_json(),
                "verify_reads": self._check is not None, "token": self._head.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        manifest = parse_manifest(state["manifest"], "pickled store")
        backend = backend_from_state(state["backend"])
        self.__init__(backend, manifest, mode="r", verify_reads=state.get("verify_reads", False),  # type: ignore[misc]
                      token=state.get("token"))
