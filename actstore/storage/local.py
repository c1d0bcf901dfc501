"""A store in a local directory: the :class:`~actstore.storage.base.Backend` of ``actstore.open(path)``.

Objects are written in place by the engine; the manifest is replaced by an
atomic rename (:func:`~actstore.storage.files.atomic_write`) under the writer's
``flock`` (:class:`StoreLock`), whose version token is the BLAKE3 of its bytes.
Also here: putting an immutable object's files into another store by hard links
(:func:`link_object`, used by adopt and clone).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from actstore.errors import CorruptStoreError, StoreExistsError, StoreLockedError
from actstore.format.layout import LOCK_DIR, PARTS_DIR
from actstore.format.manifest import group_document
from actstore.storage import files as fsio
from actstore.storage.base import OBJECT_DIRS, Backend
from actstore.storage.checksum import checksum

__all__ = ["LocalBackend", "StoreLock", "dir_size", "forked_message", "link_object"]


class LocalBackend(Backend):
    """A store in the local directory ``root`` (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.url = root
        self._lock: StoreLock | None = None  # the writer lock this backend's writer took (publish checks it)

    def read_manifest(self) -> tuple[bytes, str]:
        data = fsio.read_document(os.path.join(self.root, "zarr.json"))  # regular file, no link, bounded
        return data, checksum(data)

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.root, "zarr.json"))

    def publish(self, data: bytes, expected: str | None, new_objects: Sequence[str]) -> str:
        # The objects are durable already (the engine fsyncs each as it finishes it).  The check and the rename
        # below happen under the writer's flock, which this process must hold (a forked child holds none).
        if self._lock is not None:
            self._lock.check()
        try:
            _, token = self.read_manifest()
        except FileNotFoundError:
            token = None
        if token != expected:
            if expected is None:
                raise StoreExistsError(f"{self.root}: another writer created a store here meanwhile")
            raise StoreLockedError(f"{self.root}: the manifest was changed by another writer; this commit was not "
                                   "applied — reopen the store")
        fsio.atomic_write(os.path.join(self.root, "zarr.json"), data)  # the commit point
        return checksum(data)

    def before_create(self) -> None:
        root = self.root
        if os.path.exists(root) and (not os.path.isdir(root) or set(os.listdir(root)) - {*OBJECT_DIRS, LOCK_DIR,
                                                                                          PARTS_DIR}):
            raise StoreExistsError(f"{root}: exists and is not an empty directory")
        os.makedirs(root, exist_ok=True)

    def initialize(self) -> None:
        for sub in OBJECT_DIRS:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
            fsio.write_durable(os.path.join(self.root, sub, "zarr.json"), group_document())
            fsio.fsync_dir(os.path.join(self.root, sub))
        fsio.fsync_dir(self.root)
        fsio.fsync_dir(os.path.dirname(self.root))

    def list_objects(self, directory: str) -> list[str]:
        d = os.path.join(self.root, directory)
        if os.path.islink(d):  # deleting "unreferenced" entries there would delete outside the store
            raise CorruptStoreError(f"{d}: is a symbolic link; stores never contain links (not cleaning up there)")
        return [n for n in (os.listdir(d) if os.path.isdir(d) else ()) if n != "zarr.json"]

    def delete_object(self, directory: str, name: str) -> None:
        p = os.path.join(self.root, directory, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)

    def remove_leftovers(self, keep: set[str]) -> list[str]:
        removed = []
        for name in os.listdir(self.root):  # manifest temp files of a commit cut short
            if name.startswith(".zarr.json.") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.root, name))
                removed.append(name)
        return removed

    def lock(self) -> StoreLock:
        self._lock = StoreLock(self.root)
        return self._lock

    def size(self) -> int:
        return dir_size(self.root)

    def state(self) -> dict[str, Any]:
        return {"kind": "local", "root": self.root}


def dir_size(root: str) -> int:
    """Bytes of the files under ``root`` (links not followed)."""
    size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, name)).st_size
    return size


def link_object(src: str, dst: str, files: Iterable[str], *, copy: bool = False) -> None:
    """Put an immutable object's files (and its ``zarr.json``) at ``dst``, durably: hard links, or copies.

    Committed files are never modified, so a hard link shares them safely
    between stores (deleting the source store later leaves ``dst`` intact).
    Where a link is impossible (another filesystem, a filesystem without hard
    links) or ``copy`` is set, the bytes are copied and fsynced.  ``dst`` must
    not exist; on failure it is left for :func:`~actstore.storage.base.remove_unreferenced`.
    """
    os.mkdir(dst)
    dirs = {dst}
    for rel in [*files, "zarr.json"]:
        s, d = os.path.join(src, *rel.split("/")), os.path.join(dst, *rel.split("/"))
        parent = os.path.dirname(d)
        if parent not in dirs:
            os.makedirs(parent, exist_ok=True)
            while parent not in dirs and len(parent) > len(dst):
                dirs.add(parent)
                parent = os.path.dirname(parent)
        if not copy:
            try:
                os.link(s, d, follow_symlinks=False)
                continue
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        with open(s, "rb") as fi, open(d, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)
            fo.flush()
            os.fsync(fo.fileno())
    for d in sorted(dirs, key=len, reverse=True):  # children first
        fsio.fsync_dir(d)
    fsio.fsync_dir(os.path.dirname(dst))



# --- the writer lock ------------------------------------------------------------


class StoreLock:
    """One writer per store, enforced with ``flock`` on ``lock/zarr.json``.

    The kernel drops the lock when its holder dies (even by ``SIGKILL``), so a
    stale lock never blocks a new writer.  The file is a valid Zarr group
    document whose attributes name the holder (pid, host, start time), only so
    that a refused writer can say who holds the lock.  ``flock`` is not reliable
    on network filesystems such as NFS: keep writers on one host there.
    """

    def __init__(self, root: str) -> None:
        directory = os.path.join(root, LOCK_DIR)
        os.makedirs(directory, exist_ok=True)
        try:  # never follow a link: the lock file is truncated and rewritten
            if os.path.islink(directory):
                raise OSError(errno.ELOOP, "a symbolic link")
            fd = os.open(os.path.join(directory, "zarr.json"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise CorruptStoreError(f"{directory}: the lock is a symbolic link; stores never contain links") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{root}: another writer holds the lock ({holder}); wait for it to finish, "
                    "or open the store with mode='r' to read"
                ) from e
            raise
        self.fd: int | None = fd
        self.root = root
        self.pid = os.getpid()
        _HELD.add(self)
        self._write({"writer": {"pid": self.pid, "host": socket.gethostname(), "since": time.time()}})

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless this process holds the lock now (right before a publish).

        An ``flock`` cannot be lost while its holder lives, but a process forked
        from the holder has no lock (its copy of the descriptor was closed at
        ``fork``): only the process that took the lock passes, and only while
        its descriptor still holds it.
        """
        pid = os.getpid()
        if self.fd is None or pid != self.pid:
            raise StoreLockedError(forked_message(self.root, self.pid, pid) if pid != self.pid else
                                   f"{self.root}: this writer released its lock; open the store again with mode='a'")
        try:  # taking a lock this open file already holds is a no-op; it fails if it holds none
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise StoreLockedError(f"{self.root}: this writer does not hold the store's lock ({e}); open the store "
                                   "again with mode='a'") from e

    def finalize(self) -> None:
        self.release()

    def _write(self, attributes: dict[str, Any]) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, group_document(attributes), 0)

    def release(self) -> None:
        if self.fd is not None:
            # A child forked while the lock was held shares it: closing our descriptor
            # alone would leave the lock held by the child, so unlock explicitly, but
            # only in the process that took the lock (a child must not drop it).
            if os.getpid() == self.pid:
                with contextlib.suppress(OSError):
                    self._write({})
                with contextlib.suppress(OSError):
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def forked_message(root: str, owner: int, pid: int) -> str:
    """Why a writer refuses to write in process ``pid``, opened in process ``owner``."""
    return (f"{root}: this store was opened for writing in process {owner}, and this is process {pid} (a forked "
            "child, such as a DataLoader worker): a forked process holds no lock on the store, so it cannot append "
            "or commit — open the store in this process (actstore.open(path, mode='a')), or write from the parent")


#: Locks held by this process, so that a forked child can drop its copies.
_HELD: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """After ``fork``: close the child's copies of the lock descriptors.

    A child shares its parent's ``flock`` through the inherited descriptor; if it
    kept it, a writer killed by ``SIGKILL`` would leave its store locked for as
    long as its children (DataLoader workers, say) live.
    """
    for lock in list(_HELD):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")["attributes"]["writer"]
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on host {str(info['host'])[:64]!r} since {since}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
