"""Files of a local store, read and written safely.

Bounded metadata reads that refuse links and special files, file names from
metadata kept inside their directory, checks of an object's ``zarr.json``
against the checksum its parent names (:mod:`actstore.storage.checksum`), and durable and
atomic writes (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from typing import Any

from actstore.errors import CorruptStoreError
from actstore.format.arrays import array_metadata, chunk_path
from actstore.format.documents import MAX_METADATA_BYTES, loads
from actstore.format.manifest import SEGMENT_ATTR
from actstore.storage.checksum import checksum

__all__ = ["HUGE_PAGE_BYTES", "HugePageFile", "array_inner_rows", "atomic_write", "expect_array", "fsync_dir", "inside",
           "object_files", "read_document", "write_durable"]



def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write a new file and fsync it (not atomic: for files no reader follows yet)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data: bytes, *, durable: bool = True, tmp: str | None = None) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync dir.

    The temporary file (``tmp``, by default a hidden name beside ``path``) is
    removed if anything fails, so a failed write leaves the old file as it was.
    ``durable=False`` skips both fsyncs (a cache, which can be fetched again).
    """
    directory = os.path.dirname(path) or "."
    if tmp is None:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        if durable:
            write_durable(tmp, data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


#: The page-cache folio size :class:`HugePageFile` writes for: a PMD-sized (2 MiB) huge page on x86-64 and arm64.
HUGE_PAGE_BYTES = 2 << 20


class HugePageFile:
    """A new file written so that its page cache is in 2 MiB folios: each ``write`` call fills whole
    2 MiB-aligned ranges of the file (the bytes of an unfinished range wait in a 2 MiB buffer).

    Why: a file system with large folios (ext4, xfs) gives the page cache of a
    range a folio as large as the ``write`` call that fills it, and a memory map
    maps a whole 2 MiB folio with one page-table entry (``FilePmdMapped`` in
    ``smaps``): random reads of such a file fault once per 2 MiB and miss the
    TLB far less.  Writes that straddle 2 MiB boundaries (small appends through
    a buffered file, or segments copied back to back) and ``os.copy_file_range``
    (a splice, page by page) leave small folios, and a map of them read random
    rows up to 2× slower here (``bench_store``: a compacted store against a
    one-commit store).  A write whose source pages are not mapped yet (a map of
    another file) may fall back to small folios for the rest of that call, so
    each call here writes one 2 MiB range at most.

    The interface is the part of a binary file the segment writer uses:
    :meth:`write` (copies into the buffer only the bytes of an unfinished
    range), :meth:`flush` (everything, the unfinished range too), :meth:`fileno`,
    :meth:`tell`, :meth:`close`.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._buf = bytearray(HUGE_PAGE_BYTES)
        self._held = 0  # bytes in the buffer: the start of the unfinished range at ``self._written``
        self._written = 0  # bytes handed to the kernel (a multiple of 2 MiB until a flush)

    def write(self, data: Any) -> int:
        """Append ``data`` (any contiguous buffer); returns its length."""
        mv = memoryview(data).cast("B")
        n, i = len(mv), 0
        room = HUGE_PAGE_BYTES - (self._written + self._held) % HUGE_PAGE_BYTES
        if self._held or room != HUGE_PAGE_BYTES:  # finish the unfinished range first
            if n < room:
                self._buf[self._held : self._held + n] = mv
                self._held += n
                return n
            # The held bytes and the head of ``data`` in one call (writev: one 2 MiB folio, as one write),
            # without copying the head into the buffer first.
            self._write_all(memoryview(self._buf)[: self._held], mv[:room])
            self._held = 0
            i = room
        while n - i >= HUGE_PAGE_BYTES:  # whole ranges straight from ``data``
            self._write_all(mv[i : i + HUGE_PAGE_BYTES])
            i += HUGE_PAGE_BYTES
        if i < n:
            self._buf[: n - i] = mv[i:]
            self._held = n - i
        return n

    def _write_all(self, mv: memoryview, more: memoryview | None = None) -> None:
        """Write ``mv`` then ``more`` (its rest after a short write too)."""
        size = len(mv) + (len(more) if more is not None else 0)
        done = os.writev(self._fd, [mv, more]) if more is not None else os.write(self._fd, mv)
        while done < size:  # a short write (a signal, a full disk): the rest, one buffer at a time
            if done < len(mv):
                done += os.write(self._fd, mv[done:])
            else:
                assert more is not None
                done += os.write(self._fd, more[done - len(mv):])
        self._written += size

    def flush(self) -> None:
        """Hand every byte to the kernel, the unfinished range too (later writes then start off a boundary)."""
        if self._held:
            self._write_all(memoryview(self._buf)[: self._held])
            self._held = 0

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        """Bytes written so far (handed to the kernel or buffered)."""
        return self._written + self._held

    def close(self) -> None:
        """Flush, then close (a second call does nothing)."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)


def inside(base: str, rel: str) -> str:
    """``base/rel`` if it stays inside ``base`` (no '..', no absolute, no symlinks)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise CorruptStoreError(f"{base}: invalid file name {rel!r:.80} in metadata")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CorruptStoreError(f"{base}: file name {rel!r:.80} in metadata leaves its directory")
    path = os.path.join(base, *parts)
    probe = base
    for p in parts:
        probe = os.path.join(probe, p)
        if os.path.islink(probe):
            raise CorruptStoreError(f"{path}: is a symbolic link; stores never contain links")
    return path


def read_document(path: str, limit: int = MAX_METADATA_BYTES) -> bytes:
    """Read a metadata file (at most ``limit`` + 1 bytes, so that oversize is detectable).

    Refuses a symbolic link or anything but a regular file (a FIFO would block
    forever) with :class:`CorruptStoreError`; other ``OSError`` propagate.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptStoreError(f"{path}: is a symbolic link; stores never contain links (not following it)") from e
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptStoreError(f"{path}: not a regular file")
        return f.read(limit + 1)


def object_files(base: str, info_meta: str, where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read and check an object's ``zarr.json`` against the manifest's digest.

    Returns (the object's attributes, file name → {size, blake3}).
    """
    meta_path = os.path.join(base, "zarr.json")
    try:
        data = read_document(meta_path)
    except OSError as e:
        raise CorruptStoreError(f"{meta_path}: cannot read ({e.strerror or e})") from e
    if checksum(data) != info_meta:
        raise CorruptStoreError(f"{meta_path}: checksum does not match the manifest ({where})")
    doc = loads(data, meta_path)
    try:
        attrs = doc["attributes"][SEGMENT_ATTR]
        files = attrs["files"]
        if not isinstance(files, dict):
            raise TypeError
        for rel, rec in files.items():
            if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("blake3"), str)):
                raise TypeError(rel)
    except (KeyError, TypeError) as e:
        raise CorruptStoreError(f"{meta_path}: malformed segment metadata ({e})") from e
    return attrs, files


def array_inner_rows(path: str, rows: int, inner: tuple[int, ...], zdtype: str, codec: Any = None) -> int:
    """Rows per inner chunk from an array's ``zarr.json`` (``path``), which must be exactly
    what the writer produces for these rows."""
    doc = loads(read_document(path, 1 << 20), path)
    try:
        inner_rows = int(doc["codecs"][0]["configuration"]["chunk_shape"][0])
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:  # (JSON 1e400 parses as inf)
        raise CorruptStoreError(f"{path}: not a single-shard array ({e})") from e
    if inner_rows < 1 or doc != array_metadata(rows, inner, zdtype, inner_rows, codec=codec):
        raise CorruptStoreError(f"{path}: metadata disagrees with the manifest (expected {rows} rows of {zdtype}{list(inner)}"
                                f"{', ' + codec['name'] if codec else ''})")
    return inner_rows


def expect_array(base: str, rel: str, rows: int, inner: tuple[int, ...], zdtype: str,
                  files: dict[str, Any], codec: Any = None) -> int:
    """The array's zarr.json must be listed and exactly what the writer produces; returns its inner rows."""
    path = os.path.join(base, rel, "zarr.json")
    if f"{rel}/zarr.json" not in files:
        raise CorruptStoreError(f"{path}: not listed in the segment metadata")
    inner_rows = array_inner_rows(path, rows, inner, zdtype, codec)
    data = f"{rel}/{chunk_path(len(inner) + 1)}"
    if rows and data not in files:
        raise CorruptStoreError(f"{os.path.join(base, data)}: not listed in the segment metadata")
    return inner_rows
