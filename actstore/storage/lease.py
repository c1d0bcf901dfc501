"""The writer lock on object storage: a lease held through conditional writes.

Object storage has no ``flock`` and no atomic rename, but S3 (and SeaweedFS,
MinIO, R2, GCS ...) can write an object *only if it does not exist*
(``If-None-Match: *``) and *only if it is unchanged* (``If-Match: <etag>``).
The lock is the object ``lock/zarr.json`` (a Zarr group document whose
attributes name the holder):

1. **Acquire**: create it with ``If-None-Match: *``.  Exactly one of several
   concurrent writers succeeds; the others read it and get
   :class:`~actstore.errors.StoreLockedError` naming the holder (host, pid,
   since when) and when its lease ends.
2. **Renew**: a daemon thread rewrites it every ``lease_seconds / 3`` with
   ``If-Match: <our last etag>``.  A renewal that fails its condition means the
   lease was taken over: the holder marks it lost and every later commit fails.
3. **Expiry and takeover**: a lock whose last write is older than its
   ``lease_seconds`` (+1 s for the server clock's resolution) — measured as the
   server's ``Date`` minus the object's ``Last-Modified``, both from the
   server's clock, so client clocks do not matter — belongs to a dead writer.
   A new writer replaces it with ``If-Match: <the etag it read>``; of several
   takers exactly one succeeds.
4. **Fence before each commit**: the writer renews synchronously just before it
   writes the manifest (and the manifest itself is written with ``If-Match:
   <the manifest etag it started from>``).  A successful renewal means nobody
   can take the lease for another ``lease_seconds``, which bounds how long the
   manifest upload may take.
5. **Release**: delete it with ``If-Match: <our etag>``.

Limits (also in docs/SCALING.md): a writer frozen for longer than its lease
(SIGSTOP, a swapped-out VM) loses the lock while it still thinks it holds it;
the fence stops it from committing, but objects it uploads after losing the
lease are orphans until the next writer's open deletes them.  On filesystems
without server-side conditional writes (anything but S3 here) the lock is
best effort.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref

from actstore.errors import RemoteError, StoreLockedError
from actstore.format.layout import LOCK_DIR
from actstore.format.manifest import group_document
from actstore.storage.objects import ObjectStore, PreconditionFailed

__all__ = ["DEFAULT_LEASE_SECONDS", "RemoteLock"]

log = logging.getLogger("actstore")

DEFAULT_LEASE_SECONDS = 60.0
LOCK_KEY = f"{LOCK_DIR}/zarr.json"
#: Added to a lease before it counts as expired: the server clock's 1 s resolution.
CLOCK_SLACK = 1.0


class RemoteLock:
    """One writer per remote store: a renewed lease on ``lock/zarr.json``.

    Raises :class:`~actstore.errors.StoreLockedError` when another live writer
    holds it.  See the module docstring for the protocol and its limits.
    """

    def __init__(self, objects: ObjectStore, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        if not isinstance(lease_seconds, (int, float)) or isinstance(lease_seconds, bool) or not 1 <= lease_seconds <= 86400:
            raise ValueError(f"lease_seconds: expected a number in [1, 86400], got {lease_seconds!r}")
        self.objects = objects
        self.lease = float(lease_seconds)
        self.id = uuid.uuid4().hex
        self.since = time.time()
        self.etag: str | None = None
        self.lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=_renew_loop, args=(weakref.ref(self), self._stop, self.lease / 3),
                                        name="actstore-lease", daemon=True)
        self._thread.start()

    def _document(self) -> bytes:
        return group_document({"writer": {
            "id": self.id, "pid": os.getpid(), "host": socket.gethostname()[:255], "since": self.since,
            "renewed": time.time(), "lease_seconds": self.lease}})

    def _acquire(self) -> None:
        url = self.objects.url
        for _ in range(3):  # the lock may vanish between our failed create and our read: try again
            try:
                self.etag = self.objects.put(LOCK_KEY, self._document(), if_none_match=True)
                return
            except PreconditionFailed:
                pass
            try:
                data, etag, modified, now = self.objects.read_tagged(LOCK_KEY)
            except FileNotFoundError:
                continue
            holder, lease = _describe(data)
            age = now - modified
            if age <= lease + CLOCK_SLACK:
                raise StoreLockedError(
                    f"{url}: another writer holds the lock ({holder}; its lease was renewed {age:.0f} s ago and "
                    f"expires in {lease + CLOCK_SLACK - age:.0f} s unless renewed); wait for it to finish, or open "
                    "the store with mode='r' to read")
            try:  # expired: take it over, unless another writer does first
                self.etag = self.objects.put(LOCK_KEY, self._document(), if_match=etag)
            except (PreconditionFailed, FileNotFoundError) as e:
                raise StoreLockedError(f"{url}: the lock of a dead writer ({holder}) was just taken over by another "
                                       "writer; try again later") from e
            log.warning("%s: took over the expired writer lock of %s (lease not renewed for %.0f s)", url, holder, age)
            return
        raise StoreLockedError(f"{url}: the lock changed hands repeatedly while being acquired; try again")

    def renew(self) -> None:
        """Extend the lease now (conditional on still holding it).

        Raises :class:`~actstore.errors.StoreLockedError` if the lease was lost.
        """
        with self._mutex:
            if self.lost is not None:
                raise StoreLockedError(self.lost)
            if self.etag is None:
                raise StoreLockedError(f"{self.objects.url}: the writer lock was released")
            try:
                self.etag = self.objects.put(LOCK_KEY, self._document(), if_match=self.etag)
            except (PreconditionFailed, FileNotFoundError) as e:
                holder = "unknown"
                try:
                    holder = _describe(self.objects.read(LOCK_KEY))[0]
                except (FileNotFoundError, RemoteError):
                    pass
                self.lost = (f"{self.objects.url}: this writer's lease expired and the lock was taken over "
                             f"(now held by {holder}); its uncommitted rows are lost — reopen the store to continue")
                raise StoreLockedError(self.lost) from e

    def release(self) -> None:
        """Stop renewing and delete the lock (only if it is still ours).  Never raises."""
        self._stop.set()
        with self._mutex:
            etag, self.etag = self.etag, None
        if etag is None or self.lost is not None:
            return
        try:
            self.objects.delete(LOCK_KEY, if_match=etag)
        except (PreconditionFailed, RemoteError, OSError) as e:
            log.warning("%s: could not release the writer lock (%s); it expires in %.0f s", self.objects.url, e,
                        self.lease)

    @property
    def held(self) -> bool:
        return self.etag is not None and self.lost is None


def _renew_loop(ref: weakref.ref[RemoteLock], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        lock = ref()
        if lock is None:
            return
        try:
            lock.renew()
        except StoreLockedError:
            log.error("%s", lock.lost)
            return
        except (RemoteError, OSError) as e:  # transient: try again next time; the fence catches a real loss
            log.warning("%s: renewing the writer lease failed (%s); retrying", lock.objects.url, e)
        del lock


def _describe(data: bytes) -> tuple[str, float]:
    """(who holds the lock, its lease in seconds) from the lock document."""
    try:
        w = json.loads(data)["attributes"]["writer"]
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(w["since"])))
        lease = min(max(float(w.get("lease_seconds", DEFAULT_LEASE_SECONDS)), 1.0), 86400.0)
        return f"pid {int(w['pid'])} on host {str(w['host'])[:64]!r} since {since}", lease
    except (ValueError, KeyError, TypeError):
        return "holder unknown", DEFAULT_LEASE_SECONDS
