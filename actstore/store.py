"""ActivationStore: create, open, look up and read an activation store, local or on object storage.

One class for every store: it reads and writes through a
:class:`~actstore.storage.base.Backend` (a local directory, or object storage
behind a chunk cache), and every change goes through the one commit,
:mod:`actstore.engine.commit`.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from actstore.engine.commit import Head, ids
from actstore.engine.gather import check_float_dtype, gather_fixed, gather_padded, gather_ragged
from actstore.engine.info import describe_store
from actstore.engine.opening import check_new, create_new, open_parts, read_head
from actstore.engine.plans import ROW_ALL, fast_gather, make_row, row_getter, row_plan
from actstore.engine.prefetch import forget_on_evict, prefetch
from actstore.engine.ragged import PaddedBatch, RaggedBatch
from actstore.engine.reader import ReadCheck, SegmentReader, Snapshot, map_object_array, normalize_keys
from actstore.engine.storeops import clone_store, delete_store
from actstore.engine.verify import VerifyReport, verify_snapshot
from actstore.engine.writing import WriterRole, describe_fields
from actstore.engine.zarrread import ZarrSegmentReader
from actstore.errors import CorruptStoreError, StoreError, StoreExistsError, StoreNotFoundError
from actstore.format.fields import Field
from actstore.format.layout import VIEWS_DIR
from actstore.format.manifest import Manifest, parse_manifest
from actstore.storage.backends import backend_for, backend_from_state, fspath
from actstore.storage.base import Backend, WriterLock
from actstore.storage.local import LocalBackend
from actstore.storage.objects import ObjectStore, is_url

__all__ = ["ActivationStore", "clone_store", "create", "create_in", "delete_store", "open", "open_in", "push",
           "read_manifest"]

#: Default bytes per inner chunk (what a generic Zarr reader fetches at a time).
DEFAULT_CHUNK_BYTES = 1 << 20


def read_manifest(root: str) -> Manifest:
    """The manifest of the local store at ``root``."""
    return read_head(LocalBackend(root))[0]


def create(
    path: str | os.PathLike[str],
    fields: Mapping[str, Field],
    *,
    fingerprint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    exist_ok: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Create an empty store and open it for appending.

    Parameters
    ----------
    path
        A directory that does not exist yet, or an empty one.
    fields
        Field name → :class:`Field`.  Names use letters, digits, ``_ . -``.
    fingerprint
        The frozen model's :func:`actstore.fingerprint`, checked by readers that
        pass ``fingerprint=`` to :func:`open`.
    attrs
        JSON-serialisable metadata kept with the store.
    chunk_bytes
        Size of the inner chunks other Zarr readers fetch; actstore itself maps
        whole shards and does not care.
    exist_ok
        Open an existing store with the same fields instead of raising.
    cache_dir, cache_bytes, storage_options
        For a URL (``s3://bucket/prefix`` or any fsspec URL) only: see
        :func:`actstore.remote.open_remote`.  Ignored for local paths.

    Raises
    ------
    StoreExistsError
        The path holds a store or other files (unless ``exist_ok`` and the store's
        fields match).

    Examples
    --------
    >>> import actstore, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with actstore.create(d + "/s", {"h": actstore.Field((4,), "float16")}) as s:
    ...     s.append([actstore.key("a")], {"h": [[1, 2, 3, 4]]})
    1
    >>> len(actstore.open(d + "/s"))
    1
    """
    checked = check_new(fields, chunk_bytes, fingerprint, attrs)
    backend = backend_for(path, cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options)
    return create_in(backend, checked, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk_bytes, exist_ok=exist_ok)


def create_in(backend: Backend, fields: dict[str, Field], *, fingerprint: str | None = None,
              attrs: Mapping[str, Any] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              exist_ok: bool = False) -> ActivationStore:
    """:func:`create` on a given backend (arguments already checked)."""
    manifest = Manifest(fields=fields, fingerprint=fingerprint, attrs=dict(attrs or {}),
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), chunk_bytes=chunk_bytes)
    got = create_new(backend, manifest)
    if got is not None:
        return ActivationStore(backend, manifest, mode="a", lock=got[1], token=got[0])
    if not exist_ok:
        backend.close()
        raise StoreExistsError(f"{backend.url}: a store already exists; open it with actstore.open(path, mode='a')")
    store = open_in(backend, "a", fingerprint=fingerprint)
    if dict(store.fields) != fields:
        store.close()
        raise StoreExistsError(
            f"{backend.url}: a store with other fields exists ({describe_fields(store.fields)}; wanted "
            f"{describe_fields(fields)})")
    return store


def open(  # noqa: A001 - mirrors zarr.open / builtins.open on purpose
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    fingerprint: str | None = None,
    verify_reads: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Open a store.

    Parameters
    ----------
    path
        The store's directory, or a URL (``s3://bucket/prefix`` or any fsspec
        URL): the store is then read through a local chunk cache and written
        through a local staging store (see :mod:`actstore.remote`).
    mode
        ``"r"`` to read a snapshot of the last commit, ``"a"`` to append (takes the
        writer lock and deletes files left by writers that crashed before
        committing).
    fingerprint
        If given, the store must have been computed by a model with this
        :func:`actstore.fingerprint`.
    verify_reads
        Check every file against its commit's BLAKE3 the first time this handle
        maps it (one extra read of each file used): damaged bytes then raise
        :class:`CorruptStoreError` instead of being returned.  Off by default.
    cache_dir, cache_bytes, storage_options
        URLs only (ignored for local paths): the chunk cache directory (``None``:
        ``~/.cache/actstore/...``; ``False``: none, read through zarr-python),
        its size limit in bytes, and options for the fsspec filesystem
        (credentials, endpoint); see :func:`actstore.remote.open_remote`.

    Raises
    ------
    StoreNotFoundError, CorruptStoreError, UnsupportedFormatError, StaleStoreError, StoreLockedError

    Opening reads one small document and maps a few index files: its cost does
    not grow with the number of rows.
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
    if is_url(path):
        if verify_reads and cache_dir is False and mode == "r":
            raise ValueError("verify_reads=True needs the chunk cache (files are checked whole); drop cache_dir=False")
    elif not os.path.isdir(fspath(path)):
        raise StoreNotFoundError(f"{fspath(path)}: no store here (not a directory)")
    backend = backend_for(path, cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options)
    return open_in(backend, mode, fingerprint=fingerprint, verify_reads=verify_reads)


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



class ActivationStore(WriterRole):
    """An activation store: rows of named fields, one row per distinct sample key.

    Obtain one with :func:`actstore.create` or :func:`actstore.open`.  A store
    opened for reading shows the snapshot of the last commit before it was
    opened (call :meth:`refresh` to see newer ones); a store opened with
    ``mode="a"`` also takes :meth:`append` and :meth:`commit`.

    Reads return ``torch.Tensor`` views of private copy-on-write memory maps:
    no copy is made, PyTorch sees a writable tensor, and writes to it never
    reach the file (see :func:`actstore.engine.reader.map_rows` for the lifetime rules).
    The same class serves stores on object storage: their files are mapped from
    the local chunk cache (``path``; ``url`` is the remote store), and
    :meth:`prefetch` warms that cache.
    """

    url: str  # (stores on object storage only)

    def __init__(self, backend: Backend, manifest: Manifest, *, mode: str, lock: WriterLock | None = None,
                 verify_reads: bool = False, token: str | None = None) -> None:
        self._backend = backend
        self.path = backend.root
        if backend.url != backend.root:  # a remote store: ``path`` is its local mirror
            self.url = backend.url
        self.mode = mode
        self._lock = lock
        self._head = Head(manifest, token)
        self._check = ReadCheck() if verify_reads else None
        self._provide = backend.provider()
        self._load(manifest)
        self._segment = None
        self._pending_views = {}
        self._pending_attrs = None
        self._closed = False
        backend.on_evict(forget_on_evict(self))  # evicted cache files: drop this handle's maps of them

    def _load(self, manifest: Manifest) -> None:
        """Make ``manifest`` this handle's snapshot: map its index runs and views now.

        A writer deletes the index runs and views that its commit superseded, so a
        reader whose manifest was replaced just before it mapped them finds them
        gone: it then reads the manifest again and retries with the newer commit.
        """
        zroot = self._backend.segment_store()
        for _ in range(100):
            try:
                snap = Snapshot(self.path, manifest, self._check, self._provide, self._newest_manifest)
                if zroot is not None:  # cache_dir=False: segment rows through zarr-python
                    snap.segments = [ZarrSegmentReader(zroot, self.path, s, snap.fields) for s in manifest.segments]
                views = self._map_views(manifest)
            except CorruptStoreError:
                newer = None if self.mode == "a" else read_head(self._backend)[0]
                if newer is None or ids(newer) == ids(manifest):
                    raise
                manifest = newer
                continue
            self._snap, self._views = snap, views
            return
        raise StoreError(f"{self._backend.url}: the manifest changed 100 times while being opened; try again")

    def _newest_manifest(self) -> Manifest:
        """The backend's manifest now (a reader of an older commit relocating a compacted segment)."""
        return read_head(self._backend)[0]

    # -- metadata -----------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The committed snapshot this handle reads: for the read path's own layers (gathers, samplers).

        Internal but public: :mod:`actstore.training` and :mod:`actstore.precompute`
        read rows through it with :mod:`actstore.engine.gather`.  It changes on
        :meth:`refresh` and :meth:`commit`; hold the store, not the snapshot.
        """
        self._check_open()
        return self._snap

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    @property
    def fields(self) -> Mapping[str, Field]:
        return self._snap.manifest.fields

    @property
    def fingerprint(self) -> str | None:
        return self._snap.manifest.fingerprint

    @property
    def attrs(self) -> Mapping[str, Any]:
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
        return self._segment.rows if self._segment is not None else 0

    @property
    def backend(self) -> Backend:
        """Where the store lives (:class:`~actstore.storage.base.Backend`)."""
        return self._backend

    @property
    def cache(self) -> Any:
        """The local :class:`~actstore.storage.chunkcache.ChunkCache` of a store on object storage (only)."""
        return self._backend.cache  # type: ignore[attr-defined]

    @property
    def objects(self) -> ObjectStore:
        """The object-storage client of a store on object storage (only)."""
        return self._backend.objects  # type: ignore[attr-defined,no-any-return]

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
        if get is not None:
            return get(row)  # type: ignore[no-any-return]
        seg, local = snap.locate(row)
        return make_row(seg.plans.get(ROW_ALL) or row_plan(seg), local, snap.aliases)

    def _row(self, seg: SegmentReader, local: int) -> dict[str, torch.Tensor]:
        return make_row(seg.plans.get(ROW_ALL) or row_plan(seg), local, self._snap.aliases)

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
            fast = fast_gather(self._snap, rows)  # plain fixed fields: straight from the maps (engine/plans.py)
            if fast is not None:
                return fast  # type: ignore[return-value]
        self._check_open()
        check_float_dtype(dtype)
        idx = self._snap.check_rows(rows)
        out: dict[str, torch.Tensor | RaggedBatch] = {}
        for name in self._field_names(fields):
            f = self.fields[name]
            if f.ragged:
                rb = gather_ragged(self._snap, name, f, idx)
                if dtype is not None and rb.values.is_floating_point() and rb.values.dtype != dtype:
                    rb = RaggedBatch(rb.values.to(dtype), rb.offsets)
                out[name] = rb
            else:
                out[name] = gather_fixed(self._snap, name, f, idx, dtype=dtype)
        return out

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
        name = self._field_names(field)[0]
        f = self.fields[name]
        if not f.ragged:
            raise ValueError(f"gather_padded: field {name!r} is not ragged (shape {f.shape}); use gather()")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        return gather_padded(self._snap, name, f, self._snap.check_rows(rows), dtype=dtype,
                             pad_to_multiple_of=pad_to_multiple_of, pad_value=pad_value)

    def _field_names(self, fields: str | list[str] | None) -> list[str]:
        """The named fields (all when None), checked: KeyError listing the store's fields."""
        if fields is None:
            return list(self.fields)
        if isinstance(fields, str):
            fields = [fields]
        unknown = [n for n in fields if n not in self.fields]
        if unknown:
            raise KeyError(f"fields {unknown} are not in the store {self.path}; it has {sorted(self.fields)}")
        return list(fields)

    def iter_rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order, as ``store[row]`` gives them (views)."""
        self._check_open()
        for seg in self._snap.segments:
            for local in range(seg.info.rows):
                yield self._row(seg, local)

    # -- integrity -------------------------------------------------------------------
    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Check every byte of the snapshot against its checksums, and its structure.

        On object storage every file is downloaded again (into the cache; with
        ``cache_dir=False`` into a temporary directory) and checked there.

        Raises
        ------
        CorruptStoreError
            Naming each damaged or missing file.

        Returns the :class:`~actstore.engine.verify.VerifyReport` when the store is sound.
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
        epoch's sampler order to warm the cache ahead of training).  With
        ``cache_bytes`` set, prefetching stops once it has queued 80% of it, so
        that it does not evict what it fetched.  ``rows=None``: the whole store.
        Returns a :class:`~actstore.engine.prefetch.Prefetch` (``wait()``,
        ``done()``, ``cancel()``); for a local store it has nothing to do.
        """
        self._check_open()
        return prefetch(self, rows, self._field_names(fields), keys)

    # -- views -----------------------------------------------------------------------
    @property
    def views(self) -> list[str]:
        """Names of the committed views."""
        return sorted(self.manifest.views)

    def view(self, name: str) -> np.ndarray:
        """A committed view: an int64 array of rows (-1 where a row is missing).  Never copies.

        Precompute records the dataset's order as a view, so that training can map
        dataset position ``i`` to its row without reading the dataset.
        """
        self._check_open()
        v = self._views.get(name)
        if v is None:
            info = self.manifest.views.get(name)
            if info is None:
                raise KeyError(f"view {name!r} is not in the store; it has {self.views}")
            v = self._views[name] = map_object_array(self.path, VIEWS_DIR, info, "row", "int64", self._check,
                                                     self._provide)
        return v

    def _map_views(self, manifest: Manifest) -> dict[str, np.ndarray]:
        # Mapped with the snapshot (like index runs): a writer deletes a replaced
        # view after its commit, and a map taken earlier survives that.
        return {
            name: map_object_array(self.path, VIEWS_DIR, info, "row", "int64", self._check, self._provide)
            for name, info in manifest.views.items()
        }

    def close(self) -> None:
        """Commit pending rows (writers), release the lock and drop this handle's maps.

        Tensors already returned stay valid: each holds its own reference to the map.
        """
        if self._closed:
            return
        try:
            if self.mode == "a" and (self._segment is not None or self._pending_views or
                                     self._pending_attrs is not None or ids(self._head.manifest) != ids(self.manifest)):
                self.commit()  # (also publishes a commit whose upload failed earlier)
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            self._backend.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never commit (or talk to a server) from a finaliser: only release the lock.
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.finalize()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")

    def _open_source(self, source: Any) -> ActivationStore:
        return source if isinstance(source, ActivationStore) else open(source)

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only; use actstore.open(path, mode='a') to append")

    # -- pickling (DataLoader workers) -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self.mode != "r":
            raise TypeError(
                f"{self.path}: a store open for appending cannot be sent to another process; "
                "open it with mode='r' there"
            )
        # The snapshot travels with the handle: a worker reads the same commit.
        return {"backend": self._backend.state(), "manifest": self.manifest.to_json(),
                "verify_reads": self._check is not None, "token": self._head.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        manifest = parse_manifest(state["manifest"], "pickled store")
        backend = backend_from_state(state["backend"])
        self.__init__(backend, manifest, mode="r", verify_reads=state.get("verify_reads", False),  # type: ignore[misc]
                      token=state.get("token"))


def push(source: str | os.PathLike[str], url: str, *, cache_dir: str | os.PathLike[str] | bool | None = None,
         storage_options: Mapping[str, Any] | None = None) -> int:
    """Upload a local store to object storage: create the remote store, or add to it; returns the rows added.

    The local store's segments are uploaded as they are (no row is rewritten),
    its views are carried over (mapped to the remote store's rows), and the
    remote manifest is written last, in one commit.  The usual workflow:
    precompute to a local or shared path (with ``torchrun`` for many GPUs),
    then ``actstore push PATH s3://bucket/store`` and train from the URL.
    """
    src = open(source)
    try:
        dst = create(url, dict(src.fields), fingerprint=src.fingerprint, attrs=dict(src.attrs),
                     chunk_bytes=src.manifest.chunk_bytes, exist_ok=True, cache_dir=cache_dir,
                     storage_options=storage_options)
        try:
            n = dst.adopt(src)
            dst.carry_views(src)
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
    return n
