"""The local chunk cache of a remote store: a mirror directory, filled whole file by whole file.

The mirror has the store's own layout (``zarr.json``, ``segments/<id>/...``,
``indexes/...``, ``views/...``), so an ordinary local
:class:`~actstore.ActivationStore` reads it with zero-copy memory maps.  Files
arrive on demand through the object backend's file hook
(:meth:`actstore.storage.object_backend.ObjectBackend.provider`), which the reader calls
just before it maps a file:

1. The object's ``zarr.json`` (a segment, index run or view) is fetched and
   checked against the BLAKE3 the manifest names; it lists the size and BLAKE3
   of every file of the object.
2. The wanted file is downloaded whole to a temporary name, its size and BLAKE3
   are checked against that record, and it is renamed into place — a reader
   never maps a partial or wrong file.  One download per file at a time across
   the processes sharing the cache (an ``flock`` per file).
3. A file is trusted only with a **verified marker**: written after a checked
   download (or after hashing a file found in the cache without one, such as
   a writer's staged files), it holds the BLAKE3 the file was checked against
   and the file's size, inode, mtime and ctime then.  A file whose marker is
   missing, names another checksum, or whose size, inode, mtime or ctime
   changed since is hashed again, and fetched again on a mismatch.  So each
   cached file is hashed once, not once per process or DataLoader worker; a
   later use costs one ``stat`` and one small read.
4. With ``cache_bytes`` set, segment data files are evicted least recently used
   (by their marker's mtime, refreshed on each use) once the cache holds more.  Unlinking a
   mapped file is safe on POSIX; the evicting process also drops its own maps
   of it so that they do not pin the disk space, and maps other processes hold
   keep their space until those processes drop them.

Layout of a cache directory::

    <cache_dir>/actstore-cache.json   which URL this caches (refuses another)
    <cache_dir>/store/                the mirror
    <cache_dir>/tmp/                  downloads in progress
    <cache_dir>/locks/                one lock file per file being downloaded
    <cache_dir>/verified/             one marker per checked file (JSON)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from actstore.errors import CorruptStoreError, StoreError
from actstore.format.layout import INDEXES_DIR, LOCK_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.manifest import group_document
from actstore.storage.checksum import checksum, hash_file
from actstore.storage.files import atomic_write, object_files
from actstore.storage.objects import ObjectStore

__all__ = ["ChunkCache", "default_cache_dir"]

log = logging.getLogger("actstore")

MARKER = "actstore-cache.json"
#: Stale downloads (of killed processes) older than this are deleted on open.
STALE_TMP_SECONDS = 3600.0
_SUBDIRS = ("store", "tmp", "locks", "verified")


def default_cache_dir(objects: ObjectStore) -> str:
    """``$ACTSTORE_CACHE_DIR`` or ``~/.cache/actstore`` (``$XDG_CACHE_HOME``), then a hash of URL and endpoint."""
    base = os.environ.get("ACTSTORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "actstore")
    digest = checksum(f"{objects.url}\0{objects.endpoint or ''}".encode())[:16]
    return os.path.join(base, digest)


class ChunkCache:
    """The mirror of one remote store (see the module docstring)."""

    def __init__(self, objects: ObjectStore, directory: str, cache_bytes: int | None = None) -> None:
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                        or cache_bytes < 0):
            raise ValueError(f"cache_bytes: expected a non-negative int or None (no limit), got {cache_bytes!r}")
        self.objects = objects
        self.dir = os.path.abspath(directory)
        self.root = os.path.join(self.dir, "store")
        self.cache_bytes = cache_bytes
        self._records: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._known: dict[str, int] = {}  # segment data file -> size (evictable)
        self._trusted: dict[str, Any] = {}  # file -> (its stat, checksum) when this process last found it sound
        self._scanned = False
        self._downloads = 0
        self._mutex = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self.on_evict: list[Callable[[str], None]] = []
        self.fetched_bytes = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._prepare()

    def _prepare(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        marker = os.path.join(self.dir, MARKER)
        want = {"url": self.objects.url, "endpoint": self.objects.endpoint}
        try:
            with open(marker) as f:
                have = json.load(f)
        except FileNotFoundError:
            if set(os.listdir(self.dir)) - {MARKER, *_SUBDIRS}:
                raise StoreError(f"cache_dir {self.dir}: not empty and not an actstore cache; pick an empty or new "
                                 "directory") from None
            tmp = f"{marker}.{uuid.uuid4().hex}"
            with open(tmp, "w") as f:
                json.dump(want, f)
            os.replace(tmp, marker)
            have = want
        except (OSError, ValueError) as e:
            raise StoreError(f"cache_dir {self.dir}: unreadable cache marker {MARKER} ({e})") from e
        if have.get("url") != want["url"]:
            raise StoreError(f"cache_dir {self.dir}: holds the cache of another store ({have.get('url')}); "
                             f"use another cache_dir for {self.objects.url}")
        for sub in _SUBDIRS:
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        for sub in (SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR):
            d = os.path.join(self.root, sub)
            os.makedirs(d, exist_ok=True)
            if not os.path.exists(os.path.join(d, "zarr.json")):
                atomic_write(os.path.join(d, "zarr.json"), group_document(), durable=False, tmp=self._tmp())
        now = time.time()
        for name in os.listdir(os.path.join(self.dir, "tmp")):
            p = os.path.join(self.dir, "tmp", name)
            with contextlib.suppress(OSError):
                if now - os.lstat(p).st_mtime > STALE_TMP_SECONDS:
                    os.unlink(p)

    def _tmp(self) -> str:
        return os.path.join(self.dir, "tmp", uuid.uuid4().hex)

    def wipe(self) -> None:
        """Delete the mirror's contents (a new store is being created at this URL), except the writer's lock."""
        for sub in os.listdir(self.root):
            if sub == LOCK_DIR:  # held by the writer that is creating the store
                continue
            p = os.path.join(self.root, sub)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        self._records.clear()
        self._known.clear()
        self._trusted.clear()
        shutil.rmtree(os.path.join(self.dir, "verified"), ignore_errors=True)  # (markers of the files gone)
        self._prepare()

    # -- objects and files -------------------------------------------------------------
    def records(self, obj: str, meta: str) -> dict[str, dict[str, Any]]:
        """File records of object ``obj`` (``segments/<id>``), whose zarr.json has BLAKE3 ``meta``."""
        got = self._records.get((obj, meta))
        if got is not None:
            return got
        base = os.path.join(self.root, *obj.split("/"))
        doc = os.path.join(base, "zarr.json")
        try:
            with open(doc, "rb") as f:
                ok = checksum(f.read()) == meta
        except FileNotFoundError:
            ok = False
        if not ok:
            try:
                data = self.objects.read(f"{obj}/zarr.json")
            except FileNotFoundError as e:
                raise CorruptStoreError(f"{self.objects.where(obj)}/zarr.json: missing on the remote store "
                                        "(a commit names it)") from e
            if checksum(data) != meta:
                raise CorruptStoreError(f"{self.objects.where(obj)}/zarr.json: checksum does not match the manifest")
            os.makedirs(base, exist_ok=True)
            atomic_write(doc, data, durable=False, tmp=self._tmp())
        _, files = object_files(base, meta, obj)
        self._records[(obj, meta)] = files
        return files

    def forget_records(self, obj: str, meta: str) -> None:
        """Read the object's file records again next time (``verify`` checks the remote copy)."""
        self._records.pop((obj, meta), None)

    def path(self, obj: str, name: str) -> str:
        return os.path.join(self.root, *obj.split("/"), *name.split("/"))

    def ensure(self, obj: str, meta: str, names: Iterable[str], *, fresh: bool = False) -> int:
        """Make files ``names`` of object ``obj`` present and whole; returns the bytes downloaded.

        ``fresh`` downloads even files already present (``verify`` of the remote bytes).
        """
        files = self.records(obj, meta)
        got = 0
        for name in names:
            rec = files.get(name)
            if rec is None:
                raise CorruptStoreError(f"{self.objects.where(obj)}/{name}: not listed in the object's zarr.json")
            got += self._ensure_file(obj, name, rec, fresh)
        return got

    def _ensure_file(self, obj: str, name: str, rec: dict[str, Any], fresh: bool) -> int:
        path = self.path(obj, name)
        evictable = obj.startswith(SEGMENTS_DIR + "/") and not name.endswith("zarr.json")
        if not fresh and self.trusted(path, rec):
            if evictable:
                self._touch(path, rec["size"])
            return 0
        # one download per file in this process (prefetch thread vs reader), and across processes (flock)
        while True:
            with self._mutex:
                ev = self._inflight.get(path)
                if ev is None:
                    ev = self._inflight[path] = threading.Event()
                    break
            ev.wait()
            if not fresh and self.trusted(path, rec):
                return 0
        try:
            with self._file_lock(path):
                if not fresh and self.trusted(path, rec):
                    return 0
                n = self._download(obj, name, rec, path)
        finally:
            with self._mutex:
                del self._inflight[path]
            ev.set()
        if evictable:
            self._touch(path, rec["size"])
            self._after_download(path)
        return n

    # -- verified markers --------------------------------------------------------------------
    def _marker(self, path: str) -> str:
        return os.path.join(self.dir, "verified", checksum(os.path.relpath(path, self.root).encode())[:32])

    def trusted(self, path: str, rec: dict[str, Any]) -> bool:
        """True when the cached file at ``path`` holds the bytes ``rec`` records (see the module docstring, 3.).

        Cheap when its marker says it was checked against ``rec``'s BLAKE3 and
        the file has not changed since (one ``stat``, one small read); otherwise
        the file is hashed now, and marked when it matches.  False: the file is
        missing or differs (the caller fetches it again).
        """
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != rec["size"]:
            return False
        seen = (_stat_key(st), rec["blake3"])
        if self._trusted.get(path) == seen:  # checked by this process, unchanged since
            return True
        try:
            with open(self._marker(path), "rb") as f:
                mark = json.loads(f.read(4096))
            if mark == _mark(path, self.root, rec, st):
                self._trusted[path] = seen
                return True
        except (OSError, ValueError):
            pass
        try:
            with open(path, "rb") as f:  # mark the file only if it did not change while it was hashed
                before = os.fstat(f.fileno())
                ok = hash_file(path, rec["size"]) == rec["blake3"]
                after = os.fstat(f.fileno())
        except OSError:
            return False
        if not ok:
            log.warning("%s: the cached copy differs from the commit; fetching it again", path)
            return False
        if _stat_key(before) == _stat_key(after) == _stat_key(st):
            self._write_marker(path, rec, after)
            self._trusted[path] = seen
        return True

    def _write_marker(self, path: str, rec: dict[str, Any], st: os.stat_result) -> None:
        with contextlib.suppress(OSError):  # an optimisation: without a marker the file is hashed again
            atomic_write(self._marker(path), json.dumps(_mark(path, self.root, rec, st)).encode(), durable=False,
                         tmp=self._tmp())

    def check_cached(self, obj: str, meta: str, name: str) -> str | None:
        """``verify``: hash the cached copy of a file, whatever its marker says; a problem, or None when the copy is
        absent or sound.  A damaged copy loses its marker, and this process's maps of it are dropped."""
        rec = self.records(obj, meta).get(name)
        path = self.path(obj, name)
        if rec is None or not os.path.exists(path):
            return None
        self._trusted.pop(path, None)
        with contextlib.suppress(OSError):
            os.unlink(self._marker(path))
        try:
            size = os.stat(path).st_size
            if size == rec["size"] and hash_file(path, size) == rec["blake3"]:
                return None
        except OSError:
            pass
        for cb in list(self.on_evict):
            with contextlib.suppress(Exception):
                cb(path)
        return (f"{path}: the cached copy of {self.objects.where(obj)}/{name} differs from the commit (fetched again; "
                "tensors read from it before may hold wrong values: open the store again)")

    def _download(self, obj: str, name: str, rec: dict[str, Any], path: str) -> int:
        rel = f"{obj}/{name}"
        tmp = self._tmp()
        try:
            try:
                self.objects.download(rel, tmp)
            except FileNotFoundError as e:
                raise CorruptStoreError(f"{self.objects.where(rel)}: missing on the remote store (a commit names "
                                        "it)") from e
            size = _size(tmp)
            if size != rec["size"]:
                raise CorruptStoreError(f"{self.objects.where(rel)}: {size} bytes on the remote store, the commit "
                                        f"recorded {rec['size']}")
            if hash_file(tmp, size) != rec["blake3"]:
                raise CorruptStoreError(f"{self.objects.where(rel)}: checksum mismatch (the remote bytes differ "
                                        "from the commit)")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            before = os.stat(tmp)
            os.replace(tmp, path)
            after = os.stat(path)
            if (before.st_ino, before.st_size, before.st_mtime_ns) == (after.st_ino, after.st_size, after.st_mtime_ns):
                self._write_marker(path, rec, after)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with self._mutex:
            self.fetched_bytes += size
        return size

    @contextlib.contextmanager
    def _file_lock(self, path: str) -> Any:
        key = checksum(os.path.relpath(path, self.root).encode())[:24]
        fd = os.open(os.path.join(self.dir, "locks", key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- least-recently-used eviction ------------------------------------------------------
    def _touch(self, path: str, size: int) -> None:
        with self._mutex:
            self._known[path] = size
        if self.cache_bytes is not None:  # the marker's mtime: the data file's is part of what the marker checks
            with contextlib.suppress(OSError):
                os.utime(self._marker(path))

    def _after_download(self, keep: str) -> None:
        if self.cache_bytes is None:
            return
        with self._mutex:
            self._downloads += 1
            rescan = not self._scanned or self._downloads % 32 == 0
            over = sum(self._known.values()) > self.cache_bytes
        if rescan or over:
            self.evict(keep={keep}, rescan=rescan or over)

    def _scan(self) -> None:
        """Find the segment data files present (other processes sharing the cache add some)."""
        known: dict[str, int] = {}
        seg_root = os.path.join(self.root, SEGMENTS_DIR)
        for dirpath, _, names in os.walk(seg_root):
            for n in names:
                if n != "zarr.json" and os.path.basename(dirpath) != SEGMENTS_DIR:
                    p = os.path.join(dirpath, n)
                    with contextlib.suppress(OSError):
                        known[p] = os.lstat(p).st_size
        with self._mutex:
            self._known = known
            self._scanned = True

    def evict(self, keep: Iterable[str] = (), rescan: bool = True) -> list[str]:
        """Delete least recently used segment data files until at most ``cache_bytes`` remain."""
        if self.cache_bytes is None:
            return []
        if rescan:
            self._scan()
        keep = set(keep)
        with self._mutex:
            total = sum(self._known.values())
            if total <= self.cache_bytes:
                return []
            candidates = [p for p in self._known if p not in keep]
        ages = []
        for p in candidates:
            with contextlib.suppress(OSError):
                try:
                    ages.append((os.lstat(self._marker(p)).st_mtime, p))
                except FileNotFoundError:
                    ages.append((os.lstat(p).st_mtime, p))
        ages.sort()
        evicted = []
        for _, p in ages:
            if total <= self.cache_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._marker(p))
            with self._mutex:
                total -= self._known.pop(p, 0)
            evicted.append(p)
        for p in evicted:
            for cb in list(self.on_evict):
                with contextlib.suppress(Exception):
                    cb(p)
        if evicted:
            log.debug("%s: evicted %d files from the chunk cache", self.dir, len(evicted))
        return evicted

    def used_bytes(self) -> int:
        self._scan()
        with self._mutex:
            return sum(self._known.values())

    # -- background downloads ----------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        with self._mutex:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="actstore-prefetch")
            pool = self._pool
        return pool.submit(fn, *args)

    def close(self) -> None:
        with self._mutex:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What a change of a file's bytes changes: device, inode, size, mtime and ctime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _mark(path: str, root: str, rec: dict[str, Any], st: os.stat_result) -> dict[str, Any]:
    """A verified marker's content: the file, the checksum it was checked against, and its state then."""
    dev, ino, size, mtime, ctime = _stat_key(st)
    return {"file": os.path.relpath(path, root).replace(os.sep, "/"), "blake3": rec["blake3"], "size": size,
            "dev": dev, "ino": ino, "mtime_ns": mtime, "ctime_ns": ctime}


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1
