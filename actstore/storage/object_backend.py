"""Stores on object storage: the :class:`~actstore.storage.base.Backend` of ``actstore.open("s3://...")``.

This is the remote protocol.  A remote store has exactly the layout of a local
one (a Zarr v3 group: the manifest in the root ``zarr.json``, immutable
``segments/``, ``indexes/`` and ``views/`` objects, ``lock/zarr.json``), so any
Zarr v3 reader with an fsspec store reads it too.  ``actstore.open(url)`` and
``actstore.create(url, ...)`` give an ordinary :class:`~actstore.ActivationStore`
over an :class:`ObjectBackend`; everything it knows about object storage is
here and in the modules this one uses (:mod:`~actstore.storage.objects`, the
client; :mod:`~actstore.storage.chunkcache`; :mod:`~actstore.storage.lease`).
The store's remote-only members (``url``, ``objects``, ``cache``) are this
backend's (:class:`~actstore.storage.base.RemoteState`).

**Reading** (mode ``"r"``).  The manifest is downloaded, and the local
:class:`~actstore.storage.chunkcache.ChunkCache` mirror is :attr:`root`: the
reader's file hook (:meth:`ObjectBackend.provider`) downloads each file whole,
checked against its BLAKE3, the first time it is needed — index runs and views
at open, segment files on first use — so every later read is a zero-copy
memory map, as fast as a local store.  ``store.prefetch`` downloads the files
of given rows in background threads; ``cache_bytes`` bounds the segment files
kept (least recently used are evicted).  ``cache_dir=False`` keeps no chunk
cache: segment rows are read through zarr-python (``zarr.open_array`` over an
fsspec store, :meth:`ObjectBackend.segment_store`) on every access, a few HTTP
range requests per gather — slow but correct, and nothing but the small index
files touches the local disk (a temporary directory).

**Writing** (``create``, mode ``"a"``).  Rows are appended to the mirror, a
local staging store.  ``commit()`` commits locally, then
:meth:`ObjectBackend.publish` uploads the commit's new immutable objects
(segment, key-index run, views), renews the writer lease, and writes the
manifest *last* — with ``If-Match`` on the manifest it started from.  A reader
therefore sees either the old commit or the new one, never part of one: each
object PUT is atomic and the manifest is the commit point.  ``commit()``
returns only after the remote manifest is written.  An upload that fails
leaves the remote store at its previous commit and the commit staged in the
mirror (:attr:`ObjectBackend.stages`): the next ``commit()`` or ``close()``
uploads it again.  One writer at a time: the leased
:class:`~actstore.storage.lease.RemoteLock` (and an ``flock`` on the mirror).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from actstore.errors import CorruptStoreError, StoreExistsError, StoreLockedError
from actstore.format.layout import INDEXES_DIR, LOCK_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.manifest import Manifest
from actstore.storage.base import OBJECT_DIRS, Backend, FileProvider
from actstore.storage.chunkcache import ChunkCache, default_cache_dir
from actstore.storage.lease import DEFAULT_LEASE_SECONDS, RemoteLock
from actstore.storage.local import LocalBackend, StoreLock, dir_size
from actstore.storage.objects import S3_DEFAULTS, ObjectStore, PreconditionFailed

__all__ = ["ObjectBackend", "ObjectLock", "make_cache"]


def make_cache(objects: ObjectStore, cache_dir: Any, cache_bytes: int | None) -> tuple[ChunkCache, str | None]:
    """The chunk cache, and a temporary directory to delete at close (``cache_dir=False``)."""
    if cache_dir is False:
        tmp = tempfile.mkdtemp(prefix="actstore-remote-")
        return ChunkCache(objects, tmp, cache_bytes), tmp
    if cache_dir is True or cache_dir is None:
        return ChunkCache(objects, default_cache_dir(objects), cache_bytes), None
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a directory, None (the default cache) or False (no cache), got {cache_dir!r}")
    return ChunkCache(objects, os.fspath(cache_dir), cache_bytes), None


def _drop(cache: ChunkCache, tmp: str | None) -> None:
    cache.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


class ObjectLock:
    """The writer lock of a remote store: the remote lease, and an ``flock`` on the local mirror it stages in."""

    def __init__(self, lease: RemoteLock, mirror: StoreLock) -> None:
        self.lease = lease
        self.mirror = mirror

    def check(self) -> None:
        if self.lease.lost:
            raise StoreLockedError(self.lease.lost)

    def release(self) -> None:
        self.mirror.release()
        self.lease.release()

    def finalize(self) -> None:
        self.lease._stop.set()  # no network in a finaliser: the lease expires by itself
        self.mirror.release()


class ObjectBackend(Backend):
    """A store on object storage, read and staged through a local chunk cache (see the module docstring)."""

    stages = True

    def __init__(self, objects: ObjectStore, cache_dir: Any = None, cache_bytes: int | None = None, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.objects = objects
        self.url = objects.url
        self.lazy = cache_dir is False
        self.lease_seconds = lease_seconds
        self._cache_args = (cache_dir, cache_bytes)
        self._cache: ChunkCache | None = None
        self._lease: RemoteLock | None = None
        self._zroot: Any = None
        self._finalizer: Any = None

    @property
    def remote(self) -> ObjectBackend:
        """This backend is its own remote state (:class:`~actstore.storage.base.RemoteState`)."""
        return self

    @property
    def cache(self) -> ChunkCache:
        """The chunk cache, made on first use (so that a missing store leaves no cache directory behind)."""
        if self._cache is None:
            cache, tmp = make_cache(self.objects, *self._cache_args)
            self._cache = cache
            self._finalizer = weakref.finalize(self, _drop, cache, tmp)
        return self._cache

    @property
    def root(self) -> str:  # type: ignore[override]
        return self.cache.root

    # -- the manifest ----------------------------------------------------------------------
    def read_manifest(self) -> tuple[bytes, str]:
        data, etag, _, _ = self.objects.read_tagged("zarr.json")
        return data, etag

    def exists(self) -> bool:
        return self.objects.exists("zarr.json")

    def publish(self, data: bytes, expected: str | None, new_objects: Sequence[str]) -> str:
        pairs = []
        for obj in new_objects:  # data first
            base = os.path.join(self.root, *obj.split("/"))
            for dirpath, _, files in os.walk(base):
                for name in files:
                    p = os.path.join(dirpath, name)
                    pairs.append((p, f"{obj}/{os.path.relpath(p, base).replace(os.sep, '/')}"))
        self.objects.upload(pairs)
        if self._lease is not None:
            self._lease.renew()  # the fence: nobody can take the lease for lease_seconds now
        try:
            if expected is None:
                return self.objects.put("zarr.json", data, if_none_match=True)
            return self.objects.put("zarr.json", data, if_match=expected)
        except PreconditionFailed as e:
            if expected is None:
                raise StoreExistsError(f"{self.url}: another writer created a store here meanwhile") from e
            try:
                now, now_etag = self.read_manifest()
            except FileNotFoundError:
                now, now_etag = b"", ""
            if now != data:
                raise StoreLockedError(f"{self.url}: the remote manifest was changed by another writer; this "
                                       "writer's commit was not applied — reopen the store") from e
            return now_etag  # our own write, whose answer was lost

    # -- files -----------------------------------------------------------------------------
    def provider(self) -> FileProvider:
        cache, root = self.cache, self.root

        def provide(base: str, meta: str, names: Sequence[str]) -> None:
            if names:
                cache.ensure(os.path.relpath(base, root).replace(os.sep, "/"), meta, names)

        return provide

    def segment_store(self) -> Any:
        """``cache_dir=False``: a read-only zarr-python store over the remote prefix; else None (files are cached)."""
        if not self.lazy:
            return None
        if self._zroot is None:
            from zarr.storage import FsspecStore

            opts = dict(self.objects.storage_options)
            if self.objects.is_s3:
                opts["config_kwargs"] = {**S3_DEFAULTS["config_kwargs"], **opts.get("config_kwargs", {})}
            self._zroot = FsspecStore.from_url(self.url, storage_options=opts, read_only=True)
        return self._zroot

    def on_evict(self, callback: Any) -> None:
        self.cache.on_evict.append(callback)

    def initialize(self) -> None:
        others = set(self.objects.listdir("")) - {*OBJECT_DIRS, LOCK_DIR}
        if others:
            raise StoreExistsError(f"{self.url}: holds other objects ({', '.join(sorted(others)[:5])}); "
                                   "pick an empty prefix")
        for sub in OBJECT_DIRS:  # an interrupted create or a deleted store's leftovers
            self.objects.delete_tree(sub)
        self.cache.wipe()
        LocalBackend(self.root).initialize()
        self.objects.upload([(os.path.join(self.root, sub, "zarr.json"), f"{sub}/zarr.json") for sub in OBJECT_DIRS])

    def list_objects(self, directory: str) -> list[str]:
        return [n for n in self.objects.listdir(directory) if n != "zarr.json"]

    def delete_object(self, directory: str, name: str) -> None:
        self.objects.delete_tree(f"{directory}/{name}")
        LocalBackend(self.root).delete_object(directory, name)

    def remove_leftovers(self, keep: set[str]) -> list[str]:
        # The mirror may hold objects of an interrupted commit: drop them (they are never uploaded).
        local = LocalBackend(self.root)
        for sub in OBJECT_DIRS:
            for name in local.list_objects(sub):
                if name not in keep:
                    local.delete_object(sub, name)
        local.remove_leftovers(keep)
        return []

    def lock(self) -> ObjectLock:
        lease = RemoteLock(self.objects, self.lease_seconds)
        try:
            mirror = StoreLock(self.root)
        except BaseException:
            lease.release()
            raise
        self._lease = lease
        return ObjectLock(lease, mirror)

    def size(self) -> int:
        return self.objects.du()

    def info(self) -> dict[str, Any]:
        return {"cache": {"dir": None if self.lazy else self.cache.dir, "bytes": dir_size(self.root),
                          "limit": self.cache.cache_bytes}}

    def state(self) -> dict[str, Any]:
        return {"kind": "object", "objects": self.objects.__getstate__(), "lazy": self.lazy,
                "cache_dir": None if self.lazy else self.cache.dir, "cache_bytes": self._cache_args[1],
                "lease_seconds": self.lease_seconds}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ObjectBackend:
        o = state["objects"]
        return cls(ObjectStore(o["url"], o["storage_options"]), False if state["lazy"] else state["cache_dir"],
                   state["cache_bytes"], lease_seconds=state.get("lease_seconds", DEFAULT_LEASE_SECONDS))

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    # -- verify ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def fresh_files(self, manifest: Manifest, progress: Any) -> Iterator[tuple[str, list[str] | None]]:
        """Download every file of ``manifest`` again, checked; yields (the directory holding them, problems).

        Reads every remote byte (into the cache; with ``cache_dir=False`` into a
        temporary directory).  The cached copy of each file is hashed first: a
        copy that differs from its commit is a problem (this handle may have
        read it), and is replaced by the fresh download.
        """
        cache, tmp = (self.cache, None) if not self.lazy else make_cache(self.objects, False, None)
        problems: list[str] = []
        try:
            objs = [(f"{SEGMENTS_DIR}/{s.id}", s.meta, s.rows) for s in manifest.segments]
            objs += [(f"{INDEXES_DIR}/{r.id}", r.meta, 0) for r in manifest.indexes]
            objs += [(f"{VIEWS_DIR}/{v.id}", v.meta, 0) for v in manifest.views.values()]
            for obj, meta, rows in objs:
                try:
                    cache.forget_records(obj, meta)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(cache.path(obj, "zarr.json"))  # check the remote copy of the metadata too
                    for name in sorted(cache.records(obj, meta)):
                        try:
                            damaged = cache.check_cached(obj, meta, name)  # the copy this handle may have read
                            if damaged is not None:
                                problems.append(damaged)
                            cache.ensure(obj, meta, [name], fresh=True)
                        except CorruptStoreError as e:
                            problems.append(str(e))
                except CorruptStoreError as e:
                    problems.append(str(e))
                progress(rows)
            yield cache.root, problems
        finally:
            if tmp is not None:
                _drop(cache, tmp)

