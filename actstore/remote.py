"""Stores on object storage: ``actstore.open("s3://bucket/store")`` and ``actstore.create("s3://...")``.

A remote store has exactly the layout of a local one (a Zarr v3 group: the
manifest in the root ``zarr.json``, immutable ``segments/``, ``indexes/`` and
``views/`` objects, ``lock/zarr.json``), so any Zarr v3 reader with an fsspec
store reads it too.

**Reading** (:func:`open_remote`, mode ``"r"``).  The manifest is downloaded,
and a local :class:`~actstore.storage.chunkcache.ChunkCache` mirror serves the reads:
an ordinary :class:`~actstore.ActivationStore` over the mirror whose pre-map
hook downloads each file whole (checked against its BLAKE3) the first time it
is needed — index runs and views at open, segment files on first use — so
every later read is a zero-copy memory map, as fast as a local store.
:meth:`RemoteStore.prefetch` downloads the files of given rows in background
threads.  ``cache_bytes`` bounds the segment files kept (least recently used
are evicted).  ``cache_dir=False`` keeps no chunk cache: rows are read through
zarr-python (``zarr.open_array`` over an fsspec store) on every access, a few
HTTP range requests per gather — slow but correct, and nothing but the small
index files touches the local disk (a temporary directory).

**Writing** (:func:`create_remote`, :func:`open_remote` mode ``"a"``).  Rows are
appended to a local staging store (the mirror).  :meth:`RemoteStore.commit`
commits locally, then uploads the commit's new immutable objects (segment,
key-index run, views), renews the writer lease, and writes the manifest *last*
— with ``If-Match`` on the manifest it started from.  A reader therefore sees
either the old commit or the new one, never part of one: each object PUT is
atomic and the manifest is the commit point.  ``commit()`` returns only after
the remote manifest is written.  An upload that fails leaves the remote store
at its previous commit; the next ``commit()`` or ``close()`` uploads again.
One writer at a time: :class:`~actstore.storage.lease.RemoteLock`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from actstore.engine.reader import Snapshot
from actstore.engine.verify import verify_store
from actstore.engine.writer import StoreLock, remove_unreferenced
from actstore.engine.zarrread import ZarrSegmentReader
from actstore.errors import CorruptStoreError, StoreError, StoreExistsError, StoreLockedError, StoreNotFoundError
from actstore.format.manifest import (
    FIELDS_DIR,
    INDEXES_DIR,
    LOCK_DIR,
    SEGMENTS_DIR,
    VIEWS_DIR,
    Field,
    Manifest,
    chunk_path,
    parse_root,
    root_document,
)
from actstore.storage.chunkcache import ChunkCache, Fetcher, default_cache_dir
from actstore.storage.files import atomic_write
from actstore.storage.lease import DEFAULT_LEASE_SECONDS, RemoteLock
from actstore.storage.objects import ObjectStore, PreconditionFailed, is_url
from actstore.store import ActivationStore, _check_fingerprint, _describe, _ids
from actstore.store import create as create_local

__all__ = ["Prefetch", "RemoteStore", "create_remote", "is_url", "open_remote", "push"]

log = logging.getLogger("actstore")

_OBJECT_DIRS = (SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR)


# --- opening ------------------------------------------------------------------------------


def _objects(url: str, storage_options: Mapping[str, Any] | None) -> ObjectStore:
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(f"storage_options: expected a dict, got {type(storage_options).__name__}")
    return ObjectStore(url, storage_options)


def _read_manifest(objects: ObjectStore) -> tuple[Manifest, str, bytes]:
    """(manifest, etag, raw bytes) of the remote root zarr.json."""
    try:
        data, etag, _, _ = objects.read_tagged("zarr.json")
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"{objects.url}: no store here (no zarr.json); create one with actstore.create()") from e
    return parse_root(data, objects.where("zarr.json")), etag, data


def _cache(objects: ObjectStore, cache_dir: Any, cache_bytes: int | None) -> tuple[ChunkCache, str | None]:
    """The chunk cache, and a temporary directory to delete at close (``cache_dir=False``)."""
    if cache_dir is False:
        tmp = tempfile.mkdtemp(prefix="actstore-remote-")
        return ChunkCache(objects, tmp, cache_bytes), tmp
    if cache_dir is True or cache_dir is None:
        return ChunkCache(objects, default_cache_dir(objects), cache_bytes), None
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a directory, None (the default cache) or False (no cache), got {cache_dir!r}")
    return ChunkCache(objects, os.fspath(cache_dir), cache_bytes), None


def open_remote(
    url: str,
    mode: str = "r",
    *,
    fingerprint: str | None = None,
    verify_reads: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> RemoteStore:
    """Open a store on object storage (what :func:`actstore.open` does for a URL).

    Parameters
    ----------
    url
        ``s3://bucket/prefix`` or any fsspec URL.
    mode, fingerprint, verify_reads
        As for :func:`actstore.open`.  ``mode="a"`` takes the remote writer lease.
    cache_dir
        The local chunk cache: a directory, ``None`` for
        ``~/.cache/actstore/<hash of URL and endpoint>`` (``$ACTSTORE_CACHE_DIR``
        overrides the base), or ``False`` for none (reads go through zarr-python;
        a writer then stages in a temporary directory).
    cache_bytes
        Keep at most this many bytes of segment files in the cache (least
        recently used are evicted); ``None`` (default) keeps everything.
    storage_options
        Passed to the fsspec filesystem (``key``, ``secret``, ``endpoint_url``,
        ``config_kwargs`` …); by default credentials and endpoint come from the
        environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_ENDPOINT_URL``).
    lease_seconds
        Writers: the lock lease (renewed every third of it).

    Raises
    ------
    StoreNotFoundError, StoreLockedError, RemoteError, MissingDependencyError, CorruptStoreError
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
    if verify_reads and cache_dir is False and mode == "r":
        raise ValueError("verify_reads=True needs the chunk cache (files are checked whole); drop cache_dir=False")
    objects = _objects(url, storage_options)
    if mode == "r":
        return _reader(objects, fingerprint, verify_reads, cache_dir, cache_bytes)
    lease = RemoteLock(objects, lease_seconds)
    cache: ChunkCache | None = None
    tmp: str | None = None
    try:
        manifest, etag, data = _read_manifest(objects)
        _check_fingerprint(objects.url, manifest, fingerprint)
        _remove_unreferenced_remote(objects, manifest)
        cache, tmp = _cache(objects, cache_dir, cache_bytes)
        return _writer(objects, cache, tmp, manifest, etag, data, lease, verify_reads)
    except BaseException:
        lease.release()
        if cache is not None:
            _drop(cache, tmp)
        raise


def _reader(objects: ObjectStore, fingerprint: str | None, verify_reads: bool, cache_dir: Any,
            cache_bytes: int | None) -> RemoteStore:
    manifest, etag, _ = _read_manifest(objects)
    _check_fingerprint(objects.url, manifest, fingerprint)
    cache, tmp = _cache(objects, cache_dir, cache_bytes)
    try:
        return RemoteStore(objects, cache, manifest, mode="r", verify_reads=verify_reads, lazy=cache_dir is False,
                           temp_dir=tmp, remote_etag=etag)
    except BaseException:
        _drop(cache, tmp)
        raise


def _writer(objects: ObjectStore, cache: ChunkCache, tmp: str | None, manifest: Manifest, etag: str, data: bytes,
            lease: RemoteLock, verify_reads: bool) -> RemoteStore:
    """The writer handle: the mirror becomes the staging store, at the remote's commit."""
    lock = StoreLock(cache.root)
    try:
        atomic_write(os.path.join(cache.root, "zarr.json"), data)
        removed = remove_unreferenced(cache.root, manifest)
        if removed:
            log.debug("%s: dropped %d stale objects from the local mirror", objects.url, len(removed))
        return RemoteStore(objects, cache, manifest, mode="a", lock=lock, lease=lease, verify_reads=verify_reads,
                           temp_dir=tmp, remote_etag=etag)
    except BaseException:
        lock.release()
        raise


def _remove_unreferenced_remote(objects: ObjectStore, manifest: Manifest) -> list[str]:
    """Delete remote objects no commit references (left by writers that died mid-upload).  Lease held."""
    keep = {s.id for s in manifest.segments} | {r.id for r in manifest.indexes} | {v.id for v in manifest.views.values()}
    removed = []
    for sub in _OBJECT_DIRS:
        for name in objects.listdir(sub):
            if name != "zarr.json" and name not in keep:
                objects.delete_tree(f"{sub}/{name}")
                removed.append(f"{sub}/{name}")
    if removed:
        log.info("%s: removed %d uncommitted objects of an interrupted writer", objects.url, len(removed))
    return removed


def create_remote(
    url: str,
    fields: Mapping[str, Field],
    *,
    fingerprint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    chunk_bytes: int | None = None,
    exist_ok: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> RemoteStore:
    """Create an empty store on object storage and open it for appending (what :func:`actstore.create` does for a URL).

    The prefix must hold no store (leftovers of an interrupted create are
    deleted; other objects make it refuse).  Other parameters as for
    :func:`actstore.create` and :func:`open_remote`.
    """
    objects = _objects(url, storage_options)
    extra: dict[str, Any] = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    if objects.exists("zarr.json"):
        if not exist_ok:
            raise StoreExistsError(f"{objects.url}: a store already exists; open it with actstore.open(url, mode='a')")
        store = open_remote(url, "a", fingerprint=fingerprint, cache_dir=cache_dir, cache_bytes=cache_bytes,
                            storage_options=storage_options, lease_seconds=lease_seconds)
        if dict(store.fields) != dict(fields):
            store.close()
            raise StoreExistsError(f"{objects.url}: a store with other fields exists ({_describe(store.fields)}; "
                                   f"wanted {_describe(fields)})")
        return store
    lease = RemoteLock(objects, lease_seconds)
    cache: ChunkCache | None = None
    tmp: str | None = None
    try:
        if objects.exists("zarr.json"):  # created by another writer between our check and our lock
            lease.release()
            return create_remote(url, fields, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk_bytes,
                                 exist_ok=exist_ok, cache_dir=cache_dir, cache_bytes=cache_bytes,
                                 storage_options=storage_options, lease_seconds=lease_seconds)
        others = set(objects.listdir("")) - {*_OBJECT_DIRS, LOCK_DIR}
        if others:
            raise StoreExistsError(f"{objects.url}: holds other objects ({', '.join(sorted(others)[:5])}); "
                                   "pick an empty prefix")
        for sub in _OBJECT_DIRS:  # an interrupted create or a deleted store's leftovers
            objects.delete_tree(sub)
        cache, tmp = _cache(objects, cache_dir, cache_bytes)
        cache.wipe()
        local = create_local(cache.root, fields, fingerprint=fingerprint, attrs=attrs, **extra)
        manifest = local.manifest
        local.close()
        with open(os.path.join(cache.root, "zarr.json"), "rb") as f:
            data = f.read()
        objects.upload([(os.path.join(cache.root, sub, "zarr.json"), f"{sub}/zarr.json") for sub in _OBJECT_DIRS])
        lease.renew()
        try:
            etag = objects.put("zarr.json", data, if_none_match=True)
        except PreconditionFailed as e:
            raise StoreExistsError(f"{objects.url}: another writer created a store here meanwhile") from e
        return _writer(objects, cache, tmp, manifest, etag, data, lease, False)
    except BaseException:
        lease.release()
        if cache is not None:
            _drop(cache, tmp)
        raise


def push(source: str | os.PathLike[str], url: str, *, cache_dir: str | os.PathLike[str] | bool | None = None,
         storage_options: Mapping[str, Any] | None = None) -> int:
    """Upload a local store to object storage: create the remote store, or add to it; returns the rows added.

    The local store's segments are uploaded as they are (no row is rewritten),
    its views are carried over (mapped to the remote store's rows), and the
    remote manifest is written last, in one commit.  The usual workflow:
    precompute to a local or shared path (with ``torchrun`` for many GPUs),
    then ``actstore push PATH s3://bucket/store`` and train from the URL.
    """
    from actstore.store import open as open_local

    src = open_local(source)
    try:
        dst = create_remote(url, dict(src.fields), fingerprint=src.fingerprint, attrs=dict(src.attrs),
                            chunk_bytes=src.manifest.chunk_bytes, exist_ok=True, cache_dir=cache_dir,
                            storage_options=storage_options)
        try:
            n = dst.adopt(src)
            for name in src.views:
                v = np.asarray(src.view(name))
                mapped = np.full(len(v), -1, np.int64)
                ok = v >= 0
                if ok.any():
                    mapped[ok] = dst.lookup(src.key_at(v[ok]))
                dst.set_view(name, mapped)
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
    return n


def _drop(cache: ChunkCache, tmp: str | None) -> None:
    cache.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the store -----------------------------------------------------------------------------


class RemoteStore(ActivationStore):
    """A store on object storage, read through a local chunk cache (see the module docstring).

    Everything :class:`~actstore.ActivationStore` offers works the same; reads
    are zero-copy memory maps of the cached files (or, with ``cache_dir=False``,
    copies read through zarr-python).  ``path`` is the local mirror; ``url`` the
    remote store.
    """

    def __init__(self, objects: ObjectStore, cache: ChunkCache, manifest: Manifest, *, mode: str,
                 lock: StoreLock | None = None, lease: RemoteLock | None = None, verify_reads: bool = False,
                 lazy: bool = False, temp_dir: str | None = None, remote_etag: str | None = None) -> None:
        self.objects = objects
        self.url = objects.url
        self.cache = cache
        self._lease = lease
        self._lazy = lazy
        self._temp_dir = temp_dir
        self._remote = (manifest, remote_etag)
        self._zroot: Any = None
        self._finalizer = weakref.finalize(self, _drop, cache, temp_dir)
        super().__init__(cache.root, manifest, mode=mode, lock=lock, verify_reads=verify_reads)
        cache.on_evict.append(_weak_forget(self))

    # -- the snapshot ---------------------------------------------------------------------
    def _load(self, manifest: Manifest) -> None:
        """Map ``manifest``'s index runs and views (downloading them); retry on a newer commit if they vanished."""
        if not isinstance(self._check, Fetcher):
            self._check = Fetcher(self.cache, self._check, segments=not self._lazy)  # type: ignore[assignment]
        for _ in range(20):
            try:
                snap = Snapshot(self.path, manifest, self._check)
                if self._lazy:
                    snap.segments = [ZarrSegmentReader(self._zarr_root(), self.path, s, snap.fields)
                                     for s in manifest.segments]
                views = self._map_views(manifest)
            except CorruptStoreError:
                if self.mode == "a":
                    raise
                newer, etag, _ = _read_manifest(self.objects)
                if _ids(newer) == _ids(manifest):
                    raise
                manifest, self._remote = newer, (newer, etag)
                continue
            self._snap, self._views = snap, views
            return
        raise StoreError(f"{self.url}: the manifest changed 20 times while being opened; try again")

    def _zarr_root(self) -> Any:
        if self._zroot is None:
            from zarr.storage import FsspecStore

            opts = dict(self.objects.storage_options)
            if self.objects.is_s3:
                from actstore.storage.objects import S3_DEFAULTS

                opts["config_kwargs"] = {**S3_DEFAULTS["config_kwargs"], **opts.get("config_kwargs", {})}
            self._zroot = FsspecStore.from_url(self.url, storage_options=opts, read_only=True)
        return self._zroot

    def refresh(self) -> bool:
        """Download the manifest again; True if a newer commit became visible (readers)."""
        self._check_open()
        if self.mode == "a":
            return False  # the lease holder's own commits are the newest
        manifest, etag, _ = _read_manifest(self.objects)
        if manifest.generation == self.generation:
            return False
        self._remote = (manifest, etag)
        self._load(manifest)
        return True

    def _forget(self, path: str) -> None:
        """Drop this handle's maps of an evicted file (views handed out keep theirs)."""
        rel = os.path.relpath(path, os.path.join(self.path, SEGMENTS_DIR)).replace(os.sep, "/")
        seg_id, _, inner = rel.partition("/")
        name = inner.rsplit("/c/", 1)[0]
        keys = ["keys"] if name == "keys" else []
        if name.startswith(FIELDS_DIR + "/"):
            field = name[len(FIELDS_DIR) + 1:]
            base = field.rsplit("/", 1)[0] if field.endswith(("/values", "/offsets")) else field
            keys = [base, base + "/offsets"]
        for seg in self._snap.segments:
            if seg.info.id == seg_id:
                for k in keys:
                    seg.arrays.pop(k, None)

    # -- prefetch ---------------------------------------------------------------------------
    def prefetch(self, rows: Any = None, fields: list[str] | str | None = None, *, keys: bool = False) -> Prefetch:
        """Download, in background threads, the files that reading ``rows`` will need.

        Segment files are fetched in the order the rows first touch them (pass an
        epoch's sampler order to warm the cache ahead of training).  With
        ``cache_bytes`` set, prefetching stops once it has queued 80% of it, so
        that it does not evict what it fetched.  ``rows=None``: the whole store.
        Returns a :class:`Prefetch` (``wait()``, ``done()``, ``cancel()``).
        """
        self._check_open()
        snap = self._snap
        if self._lazy or not snap.segments:
            return Prefetch([])
        names = self._field_names(fields)
        if rows is None:
            order = np.arange(len(snap.segments))
        else:
            idx = snap.check_rows(rows)
            seg = np.searchsorted(snap.starts, idx, side="right") - 1
            _, first = np.unique(seg, return_index=True)
            order = seg[np.sort(first)]
        budget = [int(self.cache.cache_bytes * 0.8) if self.cache.cache_bytes is not None else None]
        futures = []
        for s in order.tolist():
            info = snap.segments[s].info
            files = [f"keys/{chunk_path(2)}"] if keys else []
            for n in names:
                f = self.fields[n]
                if f.ragged:
                    files.append(f"{FIELDS_DIR}/{n}/offsets/{chunk_path(1)}")
                    if info.values[n]:
                        files.append(f"{FIELDS_DIR}/{n}/values/{chunk_path(len(f.inner_shape) + 1)}")
                else:
                    files.append(f"{FIELDS_DIR}/{n}/{chunk_path(len(f.inner_shape) + 1)}")
            futures.append(self.cache.submit(_prefetch_one, self.cache, f"{SEGMENTS_DIR}/{info.id}", info.meta, files,
                                             budget))
        return Prefetch(futures)

    # -- writing ----------------------------------------------------------------------------
    def commit(self) -> int:
        """Commit locally, upload the new objects, then write the remote manifest.

        Returns when the remote manifest is written (the commit is visible to
        every reader that opens or refreshes).  Raises
        :class:`~actstore.errors.StoreLockedError` if the lease was lost, and
        :class:`~actstore.errors.RemoteError` if the upload failed — the remote
        store then still shows the previous commit, and the next ``commit()`` or
        ``close()`` uploads again.
        """
        self._check_writable()
        if self._lease is not None and self._lease.lost:
            raise StoreLockedError(self._lease.lost)
        generation = super().commit()
        self._push()
        return generation

    def adopt(self, sources: object, *, copy: bool = False) -> int:
        """As :meth:`ActivationStore.adopt` (into the local staging store), then upload the commit like :meth:`commit`."""
        self._check_writable()
        if self._lease is not None and self._lease.lost:
            raise StoreLockedError(self._lease.lost)
        n = super().adopt(sources, copy=copy)
        self._push()
        return n

    def _push(self) -> None:
        remote, etag = self._remote
        local = self.manifest
        if _ids(local) == _ids(remote):
            return
        have = {s.id for s in remote.segments} | {r.id for r in remote.indexes} | {v.id for v in remote.views.values()}
        new = [(SEGMENTS_DIR, s.id) for s in local.segments] + [(INDEXES_DIR, r.id) for r in local.indexes] + \
              [(VIEWS_DIR, v.id) for v in local.views.values()]
        pairs = []
        for sub, obj in new:
            if obj in have:
                continue
            base = os.path.join(self.path, sub, obj)
            for dirpath, _, files in os.walk(base):
                for name in files:
                    p = os.path.join(dirpath, name)
                    pairs.append((p, f"{sub}/{obj}/{os.path.relpath(p, base).replace(os.sep, '/')}"))
        self.objects.upload(pairs)
        if self._lease is not None:
            self._lease.renew()  # the fence: nobody can take the lease for lease_seconds now
        try:
            new_etag = self.objects.put("zarr.json", root_document(local), if_match=etag)
        except PreconditionFailed as e:
            now, now_etag, _ = _read_manifest(self.objects)
            if _ids(now) != _ids(local):
                raise StoreLockedError(f"{self.url}: the remote manifest was changed by another writer (generation "
                                       f"{now.generation}); this writer's commit was not applied — reopen the store") from e
            new_etag = now_etag  # our own write, whose answer was lost
        self._remote = (local, new_etag)
        keep = {s.id for s in local.segments} | {r.id for r in local.indexes} | {v.id for v in local.views.values()}
        for sub, objs in ((INDEXES_DIR, remote.indexes), (VIEWS_DIR, list(remote.views.values()))):
            for o in objs:
                if o.id not in keep:  # superseded: readers that fetched it keep their copy
                    try:
                        self.objects.delete_tree(f"{sub}/{o.id}")
                    except OSError as e:
                        log.warning("%s: could not delete superseded %s/%s (%s)", self.url, sub, o.id, e)

    def close(self) -> None:
        """Commit and upload pending rows (writers), release the lease, and stop background downloads."""
        if self._closed:
            return
        try:
            super().close()
            if self.mode == "a":
                self._push()  # a commit whose upload failed earlier
        finally:
            self._closed = True
            if self._lease is not None:
                self._lease.release()
                self._lease = None
            self._finalizer()

    def __del__(self) -> None:
        lease = getattr(self, "_lease", None)
        if lease is not None:
            lease._stop.set()  # no network in a finaliser: the lease expires by itself
        super().__del__()

    # -- integrity and metadata -------------------------------------------------------------
    def verify(self, *, progress: bool = False) -> Any:
        """Download every file of the snapshot again and check it, then the store's structure.

        Reads every remote byte (into the cache; with ``cache_dir=False`` into a
        temporary directory).  Raises :class:`CorruptStoreError` naming each
        damaged or missing object; returns the report otherwise.
        """
        self._check_open()
        from tqdm.auto import tqdm

        m = self.manifest
        cache, tmp = (self.cache, None) if not self._lazy else _cache(self.objects, False, None)
        problems: list[str] = []
        try:
            objs = [(f"{SEGMENTS_DIR}/{s.id}", s.meta, s.rows) for s in m.segments]
            objs += [(f"{INDEXES_DIR}/{r.id}", r.meta, 0) for r in m.indexes]
            objs += [(f"{VIEWS_DIR}/{v.id}", v.meta, 0) for v in m.views.values()]
            with tqdm(total=len(self), unit="row", desc="verify", disable=not progress) as bar:
                for obj, meta, rows in objs:
                    try:
                        cache._records.pop((obj, meta), None)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(cache.path(obj, "zarr.json"))  # check the remote copy of the metadata too
                        for name in sorted(cache.records(obj, meta)):
                            try:
                                cache.ensure(obj, meta, [name], fresh=True)
                            except CorruptStoreError as e:
                                problems.append(str(e))
                    except CorruptStoreError as e:
                        problems.append(str(e))
                    bar.update(rows)
            report = verify_store(cache.root, m) if not problems else None
            if report is not None:
                problems = [p.replace(cache.root, self.url) for p in report.problems]
            if problems:
                shown = "\n  ".join(problems[:20])
                more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
                raise CorruptStoreError(f"{self.url}: {len(problems)} problem(s):\n  {shown}{more}")
            return report
        finally:
            if tmp is not None:
                _drop(cache, tmp)

    def info(self) -> dict[str, Any]:
        """As :meth:`ActivationStore.info`, for the remote store; ``cache`` describes the local chunk cache."""
        out = super().info()
        out["cache"] = {"dir": None if self._lazy else self.cache.dir, "bytes": out["bytes_on_disk"],
                        "limit": self.cache.cache_bytes}
        out["path"] = self.url
        out["bytes_on_disk"] = self.objects.du()
        return out

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, mode={self.mode!r}, rows={len(self)}, fields={{{_describe(self.fields)}}})"

    # -- pickling (DataLoader workers) ------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # refuses writers
        state["verify_reads"] = isinstance(self._check, Fetcher) and self._check.inner is not None
        state["remote"] = {"objects": self.objects.__getstate__(), "lazy": self._lazy,
                           "cache_dir": None if self._lazy else self.cache.dir, "cache_bytes": self.cache.cache_bytes,
                           "etag": self._remote[1]}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        restore(self, state)


def restore(store: ActivationStore, state: dict[str, Any]) -> None:
    """Unpickle a :class:`RemoteStore` (also into a bare ``ActivationStore`` made by ``__new__``)."""
    from actstore.format.manifest import parse_manifest

    r = state["remote"]
    objects = ObjectStore(r["objects"]["url"], r["objects"]["storage_options"])
    lazy = bool(r["lazy"])
    cache, tmp = _cache(objects, False if lazy else r["cache_dir"], r["cache_bytes"])
    store.__class__ = RemoteStore
    RemoteStore.__init__(store, objects, cache, parse_manifest(state["manifest"], "pickled store"),  # type: ignore[arg-type]
                         mode="r", verify_reads=state.get("verify_reads", False), lazy=lazy, temp_dir=tmp,
                         remote_etag=r.get("etag"))


def _weak_forget(store: RemoteStore) -> Any:
    ref = weakref.ref(store)

    def forget(path: str) -> None:
        s = ref()
        if s is not None and not s._closed:
            s._forget(path)

    return forget


# --- prefetch ---------------------------------------------------------------------------------


class Prefetch:
    """Background downloads started by :meth:`RemoteStore.prefetch`."""

    def __init__(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the downloads; returns the bytes downloaded (re-raises a download's error)."""
        done, pending = concurrent.futures.wait(self.futures, timeout)
        if pending:
            raise TimeoutError(f"prefetch: {len(pending)} of {len(self.futures)} downloads still running")
        return sum(f.result() for f in self.futures if not f.cancelled())

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


def _prefetch_one(cache: ChunkCache, obj: str, meta: str, files: list[str], budget: list[int | None]) -> int:
    records = cache.records(obj, meta)
    if budget[0] is not None:
        need = sum(records[f]["size"] for f in files if f in records)
        if need > budget[0]:
            return 0
        budget[0] -= need  # (approximate under threads: a budget, not a guarantee)
    return cache.ensure(obj, meta, files)
