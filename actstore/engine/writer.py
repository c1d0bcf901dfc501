"""Appending rows and the commit protocol.

A store changes only by *adding* immutable segments and then atomically
replacing the manifest (the root ``zarr.json``).  The steps of one commit:

1. The pending segment's shard files are finished (padding, shard index,
   CRC32C), flushed and fsynced.
2. Each array's ``zarr.json`` and the segment's ``zarr.json`` (which records the
   size and BLAKE3 of every file in the segment) are written and fsynced, and so
   are the directories that hold them.
3. A key-index run for the new rows is written the same way (and, when runs pile
   up, all runs are merged into one).
4. The new manifest — naming the segment by id and the BLAKE3 of its
   ``zarr.json`` — is written to a temporary file, fsynced, renamed over
   ``zarr.json`` and the store directory is fsynced.  **This rename is the
   commit point.**

A crash before step 4 leaves the old manifest in place, and the next writer
deletes the unreferenced files.  Readers only ever follow the manifest, so they
never see a half-written segment.  Only one writer may work at a time
(:class:`StoreLock`).
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
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import blake3
import google_crc32c
import numpy as np

from actstore.engine.compressed import ChunkEncoder
from actstore.engine.keyset import KeySet
from actstore.engine.reader import key_prefixes
from actstore.errors import CorruptStoreError, StoreLockedError
from actstore.format.manifest import (
    FIELDS_DIR,
    INDEXES_DIR,
    INTERNAL_DTYPES,
    KEY_BYTES,
    LOCK_DIR,
    SEGMENT_ATTR,
    SEGMENTS_DIR,
    VIEWS_DIR,
    Field,
    IndexRunInfo,
    Manifest,
    SegmentInfo,
    array_metadata,
    chunk_path,
    dumps,
    group_document,
    inner_rows_for,
    root_document,
    shard_layout,
)
from actstore.storage import files as fsio

__all__ = ["SegmentWriter", "StoreLock", "link_object", "write_index_run", "write_manifest",
           "write_object"]

#: Merge the key index into one run when a commit would leave more than this many.
MAX_INDEX_RUNS = 8
#: A write at least this large is hashed on a helper thread while this thread writes it.
PARALLEL_HASH_BYTES = 1 << 20
#: Start write-back (``fdatasync`` on a helper thread) whenever this much data has been written
#: since the last start, so that the disk works while rows arrive and commit's fsync finds
#: little left to do.  It also keeps the dirty pages of a long append bounded.
WRITEBACK_BYTES = 64 << 20


# --- durable file primitives ---------------------------------------------------


def makedirs_durable(root: str, rel: str) -> str:
    """Create ``root/rel`` (all parts) and fsync each new directory's parent."""
    path = root
    for part in rel.split("/"):
        parent, path = path, os.path.join(path, part)
        if not os.path.isdir(path):
            os.mkdir(path)
            fsio.fsync_dir(parent)
    return path


def file_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}


# --- shard files ----------------------------------------------------------------


class ShardFile:
    """Streams rows into the single shard file of one array.

    Rows go straight to the file as they arrive (the OS buffers them);
    :meth:`finish` pads the last inner chunk and appends the Zarr shard index.
    The BLAKE3 of the whole file is computed on the way, never by reading back.
    With a ``codec`` (a compressed field), rows are cut into inner chunks of
    about ``chunk_bytes`` and each is written as one compressed frame.
    """

    def __init__(self, directory: str, inner_shape: tuple[int, ...], dtype: np.dtype[Any], zarr_dtype: str,
                 codec: Mapping[str, Any] | None = None, chunk_bytes: int = 0) -> None:
        self.directory = directory  # the array's directory
        self.inner_shape = inner_shape
        self.dtype = dtype
        self.zarr_dtype = zarr_dtype
        self.row_bytes = int(np.prod(inner_shape, dtype=np.int64)) * dtype.itemsize
        self.rows = 0
        self.codec = codec
        self._encoder: ChunkEncoder | None = None
        if codec is not None:  # inner chunks as for a large array; finish() shrinks a small one's
            inner = inner_rows_for(self.row_bytes, chunk_bytes, 2**62)
            self._encoder = ChunkEncoder(int(codec["configuration"]["level"]), inner * self.row_bytes)
        self._file: Any = None
        self._hash = blake3.blake3()
        self._rel = chunk_path(len(inner_shape) + 1)

    def write(self, rows: np.ndarray, hasher: ThreadPoolExecutor | None = None) -> int:
        """Append ``rows``; returns the bytes written.

        With ``hasher``, a large write is hashed there while this thread writes it
        (BLAKE3 and the copy into the page cache then use two cores); both are
        done when this returns, so the caller may reuse ``rows`` at once.
        """
        if not len(rows):
            return 0
        if self._file is None:
            os.makedirs(os.path.join(self.directory, os.path.dirname(self._rel)), exist_ok=True)
            self._file = open(os.path.join(self.directory, self._rel), "wb")  # noqa: SIM115
        data = memoryview(np.ascontiguousarray(rows)).cast("B")  # type: ignore[arg-type]
        self.rows += len(rows)
        if self._encoder is not None:
            return self._write_frames(self._encoder.feed(data))
        if hasher is not None and data.nbytes >= PARALLEL_HASH_BYTES:
            hashed = hasher.submit(self._hash.update, data)
            try:
                self._file.write(data)
            finally:
                hashed.result()
        else:
            self._file.write(data)
            self._hash.update(data)
        return data.nbytes

    def _write_frames(self, frames: list[bytes]) -> int:
        for frame in frames:
            self._file.write(frame)
            self._hash.update(frame)
        return sum(map(len, frames))

    def flush(self) -> int | None:
        """Hand buffered bytes to the kernel; returns the file descriptor (None before the first write)."""
        if self._file is None:
            return None
        self._file.flush()
        return int(self._file.fileno())

    def finish(self, chunk_bytes: int) -> dict[str, dict[str, Any]]:
        """Pad, append the shard index, fsync; write ``zarr.json``.  Returns file records."""
        inner_rows = inner_rows_for(self.row_bytes, chunk_bytes, self.rows)
        records: dict[str, dict[str, Any]] = {}
        if self._file is not None:
            shard_rows, n_inner = shard_layout(self.rows, inner_rows)
            inner_bytes = inner_rows * self.row_bytes
            index = np.empty((n_inner, 2), "<u8")
            if self._encoder is not None:
                self._write_frames(self._encoder.flush(inner_bytes))  # (a whole chunk already: never resized)
                sizes = np.array(self._encoder.sizes, np.uint64)
                if len(sizes) != n_inner:
                    raise AssertionError(f"{self.directory}: wrote {len(sizes)} inner chunks for {n_inner}")
                index[:, 1] = sizes
                index[:, 0] = np.cumsum(sizes) - sizes
                tail = bytearray()
            else:
                tail = bytearray((shard_rows - self.rows) * self.row_bytes)
                index[:, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(inner_bytes)
                index[:, 1] = inner_bytes
            tail += index.tobytes()
            tail += np.uint32(google_crc32c.value(index.tobytes())).astype("<u4").tobytes()
            self._file.write(tail)
            self._hash.update(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
            self._file.close()
            self._file = None
            records[self._rel] = {"size": size, "blake3": self._hash.hexdigest()}
            d = os.path.dirname(os.path.join(self.directory, self._rel))
            while len(d) > len(self.directory):  # c/0 ... then c/
                fsio.fsync_dir(d)
                d = os.path.dirname(d)
        meta = dumps(array_metadata(self.rows, self.inner_shape, self.zarr_dtype, inner_rows, codec=self.codec))
        os.makedirs(self.directory, exist_ok=True)  # an empty array has no shard file, so no directory yet
        fsio.write_durable(os.path.join(self.directory, "zarr.json"), meta)
        fsio.fsync_dir(self.directory)
        records["zarr.json"] = file_record(meta)
        return records

    def discard(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


# --- segments -------------------------------------------------------------------


class SegmentWriter:
    """The one uncommitted segment of a writer: keys and every field, streamed to disk.

    Two helper threads, started with the first large write: one hashes while
    the caller's thread writes (:meth:`ShardFile.write`), one starts write-back
    every :data:`WRITEBACK_BYTES`.  Neither outlives :meth:`finish` or
    :meth:`discard`, and a write-back error surfaces at the next write or at
    :meth:`finish` (it must: the kernel reports it only once).
    """

    def __init__(self, root: str, fields: Mapping[str, Field], chunk_bytes: int) -> None:
        self.id = uuid.uuid4().hex
        self.root = root
        self.chunk_bytes = chunk_bytes
        self.path = os.path.join(root, SEGMENTS_DIR, self.id)
        os.mkdir(self.path)
        self.rows = 0
        self.keys_seen = KeySet()
        self.prefixes: list[np.ndarray] = []
        self.arrays: dict[str, ShardFile] = {}
        self.fields = fields
        self._hasher: ThreadPoolExecutor | None = None
        self._flusher: ThreadPoolExecutor | None = None
        self._writeback: Future[None] | None = None
        self._unsynced = 0
        u8, i64 = INTERNAL_DTYPES["uint8"], INTERNAL_DTYPES["int64"]
        self.arrays["keys"] = ShardFile(os.path.join(self.path, "keys"), (KEY_BYTES,), u8, "uint8")
        self.value_counts: dict[str, int] = {}
        for name, f in fields.items():
            base = os.path.join(self.path, FIELDS_DIR, name)
            spec = f.spec
            if f.ragged:
                self.arrays[name] = ShardFile(os.path.join(base, "values"), f.inner_shape, spec.numpy, spec.zarr,
                                              f.codec, chunk_bytes)
                self.arrays[name + "/offsets"] = ShardFile(os.path.join(base, "offsets"), (), i64, "int64")
                self.arrays[name + "/offsets"].write(np.zeros(1, i64))
                self.value_counts[name] = 0
            else:
                self.arrays[name] = ShardFile(base, f.inner_shape, spec.numpy, spec.zarr, f.codec, chunk_bytes)

    def write(self, keys: np.ndarray, columns: Mapping[str, Any]) -> None:
        """Write validated rows (see :func:`actstore.engine.validate.validate_batch`)."""
        if self._writeback is not None and self._writeback.done():
            self._end_writeback()  # raises the error of a failed write-back
        if self._hasher is None and any(
                (columns[n][0] if f.ragged else columns[n]).nbytes >= PARALLEL_HASH_BYTES for n, f in self.fields.items()):
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="actstore-hash")
        prefixes = key_prefixes(keys)
        # The key set is updated on the helper thread too, while this one writes.
        added: Future[None] | None = None
        if self._hasher is not None:
            added = self._hasher.submit(self.keys_seen.add, keys)
        else:
            self.keys_seen.add(keys)
        written = 0
        try:
            for name, f in self.fields.items():
                col = columns[name]
                if f.ragged:
                    values, lengths = col
                    offsets = self.value_counts[name] + np.cumsum(lengths, dtype=np.int64)
                    written += self.arrays[name].write(values, self._hasher)
                    written += self.arrays[name + "/offsets"].write(offsets)
                    self.value_counts[name] += int(len(values))
                else:
                    written += self.arrays[name].write(col, self._hasher)
            written += self.arrays["keys"].write(keys)
        finally:
            if added is not None:
                added.result()
        self.prefixes.append(prefixes)
        self.rows += len(keys)
        self._unsynced += written
        if self._unsynced >= WRITEBACK_BYTES and self._writeback is None:
            self._start_writeback()

    def _start_writeback(self) -> None:
        fds = [fd for shard in self.arrays.values() if (fd := shard.flush()) is not None]

        def sync() -> None:
            for fd in fds:
                _fdatasync(fd)

        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="actstore-writeback")
        self._unsynced = 0
        self._writeback = self._flusher.submit(sync)

    def _end_writeback(self) -> None:
        """Wait for a running write-back; raise its error."""
        running, self._writeback = self._writeback, None
        if running is not None:
            running.result()

    def _stop_helpers(self) -> None:
        for pool in (self._hasher, self._flusher):
            if pool is not None:
                pool.shutdown(wait=True)
        self._hasher = self._flusher = None

    def finish(self) -> tuple[SegmentInfo, np.ndarray]:
        """Finish every file durably; returns the segment's info and its key prefixes."""
        try:
            self._end_writeback()  # before any file closes: it syncs their descriptors
        finally:
            self._stop_helpers()
        files: dict[str, Any] = {}
        for shard in self.arrays.values():
            rel = os.path.relpath(shard.directory, self.path).replace(os.sep, "/")
            for path, rec in shard.finish(self.chunk_bytes).items():
                files[f"{rel}/{path}"] = rec
        # Intermediate group documents so that Zarr readers can walk the tree.
        groups = [FIELDS_DIR] + [f"{FIELDS_DIR}/{n}" for n, f in self.fields.items() if f.ragged]
        for g in groups:
            doc = group_document()
            fsio.write_durable(os.path.join(self.path, g, "zarr.json"), doc)
            files[f"{g}/zarr.json"] = file_record(doc)
            fsio.fsync_dir(os.path.join(self.path, g))
        meta = group_document({SEGMENT_ATTR: {"rows": self.rows, "values": self.value_counts, "files": files}})
        fsio.write_durable(os.path.join(self.path, "zarr.json"), meta)
        fsio.fsync_dir(self.path)
        fsio.fsync_dir(os.path.dirname(self.path))
        info = SegmentInfo(self.id, self.rows, dict(self.value_counts), blake3.blake3(meta).hexdigest())
        return info, np.concatenate(self.prefixes)

    def close_files(self) -> None:
        """Close every file (after the helpers stop), keeping them on disk."""
        with contextlib.suppress(Exception):
            self._end_writeback()
        self._stop_helpers()
        for shard in self.arrays.values():
            shard.discard()

    def discard(self) -> None:
        """Drop the segment: close files and delete its directory."""
        self.close_files()
        shutil.rmtree(self.path, ignore_errors=True)


#: ``fdatasync`` where the platform has it (macOS has only ``fsync``).
_fdatasync = getattr(os, "fdatasync", os.fsync)


def write_object(root: str, directory: str, arrays: Mapping[str, tuple[np.ndarray, str]]) -> IndexRunInfo:
    """Write a small immutable object: 1-D arrays in one group, with file records.

    Used for key-index runs (``prefix``, ``row``) and views (``row``).  Each array
    is one inner chunk: these objects are read whole.
    """
    obj_id = uuid.uuid4().hex
    path = os.path.join(root, directory, obj_id)
    os.mkdir(path)
    files: dict[str, Any] = {}
    rows = 0
    for name, (data, zdtype) in arrays.items():
        shard = ShardFile(os.path.join(path, name), (), INTERNAL_DTYPES[zdtype], zdtype)
        shard.write(data)
        rows = len(data)
        for rel, rec in shard.finish(max(1, len(data)) * 8).items():
            files[f"{name}/{rel}"] = rec
    meta = group_document({SEGMENT_ATTR: {"rows": rows, "values": {}, "files": files}})
    fsio.write_durable(os.path.join(path, "zarr.json"), meta)
    fsio.fsync_dir(path)
    fsio.fsync_dir(os.path.dirname(path))
    return IndexRunInfo(obj_id, rows, blake3.blake3(meta).hexdigest())


def write_index_run(root: str, prefixes: np.ndarray, rows: np.ndarray) -> IndexRunInfo:
    """Write a key-index run: prefixes sorted ascending, with their global rows."""
    order = np.argsort(prefixes, kind="stable")  # equal prefixes keep their input order (FORMAT.md §6)
    return write_object(root, INDEXES_DIR, {"prefix": (prefixes[order], "uint64"), "row": (rows[order], "int64")})


def write_manifest(root: str, manifest: Manifest) -> None:
    """The commit point: atomically replace the root ``zarr.json``."""
    fsio.atomic_write(os.path.join(root, "zarr.json"), root_document(manifest))


def next_manifest(manifest: Manifest, segment: SegmentInfo, run: IndexRunInfo) -> Manifest:
    return replace(
        manifest,
        generation=manifest.generation + 1,
        segments=(*manifest.segments, segment),
        indexes=(*manifest.indexes, run),
    )


def link_object(src: str, dst: str, files: Iterable[str], *, copy: bool = False) -> None:
    """Put an immutable object's files (and its ``zarr.json``) at ``dst``, durably: hard links, or copies.

    Committed files are never modified, so a hard link shares them safely
    between stores (deleting the source store later leaves ``dst`` intact).
    Where a link is impossible (another filesystem, a filesystem without hard
    links) or ``copy`` is set, the bytes are copied and fsynced.  ``dst`` must
    not exist; on failure it is left for :func:`remove_unreferenced`.
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


def remove_unreferenced(root: str, manifest: Manifest) -> list[str]:
    """Delete segments, index runs and temp files that no commit references.

    Called with the lock held, when a store is opened for appending: it cleans up
    after writers that crashed before their commit point.
    """
    removed = []
    keep = {s.id for s in manifest.segments} | {r.id for r in manifest.indexes} | {v.id for v in manifest.views.values()}
    for sub in (SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR):
        d = os.path.join(root, sub)
        if os.path.islink(d):  # deleting "unreferenced" entries there would delete outside the store
            raise CorruptStoreError(f"{d}: is a symbolic link; stores never contain links (not cleaning up there)")
        for name in os.listdir(d) if os.path.isdir(d) else ():
            if name != "zarr.json" and name not in keep:
                p = os.path.join(d, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(p)
                removed.append(f"{sub}/{name}")
    for name in os.listdir(root):
        if name.startswith(".zarr.json.") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, name))
            removed.append(name)
    return removed


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
        self.pid = os.getpid()
        _HELD.add(self)
        self._write({"writer": {"pid": self.pid, "host": socket.gethostname(), "since": time.time()}})

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


@contextlib.contextmanager
def locked(root: str) -> Iterator[StoreLock]:
    lock = StoreLock(root)
    try:
        yield lock
    finally:
        lock.release()
