"""File checksums: the one place that names the algorithm (BLAKE3, as lowercase hex; docs/FORMAT.md).

A commit records the size and checksum of every file it writes (the
``"blake3"`` entry of a file record), and names each object's ``zarr.json`` by
its checksum; a local manifest's version token, the emulated ETag of a
filesystem without one and the chunk cache's directory names are checksums
too.  Content keys of samples are another thing: :mod:`actstore.format.keys`.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Mapping
from typing import Any

import blake3
import numpy as np

from actstore.errors import CorruptStoreError

__all__ = ["RELEASE_BYTES", "CheckedFile", "Hasher", "check_file", "checksum", "hash_file", "new_hasher"]

#: An incremental checksum: ``update(data)`` (thread-safe to call from a helper thread), ``hexdigest()``.
Hasher = blake3.blake3

#: Files at least this large are hashed on several threads.
_THREADS_MIN = 1 << 22
#: A check drops the pages it has hashed from its map this many bytes at a time (CheckedFile._release).
RELEASE_BYTES = 32 << 20


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum of ``data``, as hex."""
    return blake3.blake3(data).hexdigest()


def new_hasher() -> Hasher:
    """A new incremental checksum (feed it with ``update``, read it with ``hexdigest``)."""
    return blake3.blake3()


def hash_file(path: str, size: int) -> str:
    """The checksum of the file at ``path`` (``size`` bytes long), read through a memory map."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= _THREADS_MIN else 1)
    if size:
        h.update_mmap(path)
    return h.hexdigest()


def check_file(path: str, record: Mapping[str, Any], where: str) -> int:
    """Check the file at ``path`` against its ``record`` (``{"size", "blake3"}``); returns its size.

    Raises :class:`CorruptStoreError` naming ``where`` (the object and file) when
    it is missing, of another size, or its bytes differ; reads the file once.
    """
    with CheckedFile(path, record, where) as f:
        f.finish()
        return f.size


class CheckedFile:
    """A committed file read for a copy and checked against its record in the same pass.  Never copies.

    The file is mapped read-only (shared: the bytes on disk, never a private
    page this process wrote to).  The copy reads ranges of it in increasing
    order and hands each range to :meth:`consume` (from any one thread at a
    time), which hashes the bytes skipped since the last range and then the
    range; :meth:`finish` hashes the rest and compares the checksum with the
    record, raising :class:`CorruptStoreError` naming ``where`` on a mismatch.
    Only bytes that went through this check may be published: the caller
    publishes nothing before :meth:`finish` returns.

    SAFETY: arrays from :meth:`array` are views of the map; the map stays valid
    while they are referenced (closing this object only drops its own handle).
    """

    def __init__(self, path: str, record: Mapping[str, Any], where: str) -> None:
        self.path, self.where = path, where
        self.expected, self.size = str(record["blake3"]), int(record["size"])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise CorruptStoreError(f"{where}: missing") from e
        except OSError as e:
            raise CorruptStoreError(f"{where}: cannot read ({e.strerror or e})") from e
        self.fd: int | None = fd
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptStoreError(f"{where}: not a regular file")
            if st.st_size != self.size:
                raise CorruptStoreError(f"{where}: {st.st_size} bytes, the commit recorded {self.size}")
            self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ) if self.size else None
        except BaseException:
            self.close()
            raise
        self.bytes = np.frombuffer(self._map, np.uint8) if self._map is not None else np.empty(0, np.uint8)
        self._addr = int(self.bytes.__array_interface__["data"][0])
        self._hash = new_hasher()
        self._done = 0
        self._released = 0  # the map's pages below this were dropped from the process (_release)
        self.checked = False

    def array(self, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A read-only view of the bytes from ``offset`` as an array of ``shape`` (raises if the file is shorter)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + nbytes > self.size:
            raise CorruptStoreError(f"{self.where}: {self.size} bytes, shorter than the {offset + nbytes} its "
                                    "metadata needs")
        return self.bytes[offset : offset + nbytes].view(dtype).reshape(shape)

    def offset_of(self, rows: np.ndarray) -> int:
        """Where the bytes of ``rows`` (a C-contiguous view of :meth:`array`) start in the file."""
        start = int(rows.__array_interface__["data"][0]) - self._addr
        if not rows.flags.c_contiguous or start < 0 or start + rows.nbytes > self.size:
            raise ValueError(f"{self.where}: the rows given are not a contiguous range of this file's map")
        return start

    def consume(self, start: int, data: memoryview | bytes) -> None:
        """Hash the file up to ``start`` (bytes not copied), then ``data``, which are the file's bytes at ``start``.

        The pages hashed are then dropped from this process's map (:meth:`_release`): a merge of a
        file of several GB keeps only the range it is working on mapped in."""
        if start < self._done:
            raise ValueError(f"{self.where}: ranges must be read in order (at {start}, after {self._done})")
        if start > self._done:
            self._hash_to(start)
        view = memoryview(data).cast("B")
        for a in range(0, len(view), RELEASE_BYTES):  # a range at a time, each released once hashed
            part = view[a : a + RELEASE_BYTES]
            self._hash.update(part)
            self._done = start + a + len(part)
            self._release()

    def _hash_to(self, end: int) -> None:
        """Hash the file's bytes from where the check stands to ``end``, a range at a time, releasing each."""
        while self._done < end:
            stop = min(end, self._done + RELEASE_BYTES)
            self._hash.update(self.bytes[self._done : stop].data)
            self._done = stop
            self._release()

    def _release(self) -> None:
        """Drop the map's pages below the checked position from this process (``MADV_DONTNEED``).

        The map is shared and read-only: the pages stay in the page cache, and an
        array of the map that reads them again gets the same bytes back (the
        kernel maps them in again).  Only whole pages, at least
        :data:`RELEASE_BYTES` at a time.
        """
        end = self._done - self._done % mmap.PAGESIZE
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED") or end <= self._released:
            return
        if end - self._released < RELEASE_BYTES and self._done < self.size:
            return
        self._map.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
        self._released = end

    def finish(self) -> None:
        """Hash the bytes not read yet and compare with the record; raise :class:`CorruptStoreError` on a mismatch."""
        if self.checked:
            return
        if self._done < self.size:
            self._hash_to(self.size)
        if self._hash.hexdigest() != self.expected:
            raise CorruptStoreError(f"{self.where}: checksum mismatch (the bytes on disk changed since the commit)")
        self.checked = True

    def close(self) -> None:
        """Drop the file descriptor (the map lives as long as arrays of it are referenced)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
