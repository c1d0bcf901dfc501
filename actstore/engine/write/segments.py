"""Writing segments: shard files streamed to disk, and the small immutable objects (index runs, views).

Every file here is new (no reader follows it until a manifest names it), is
hashed (BLAKE3) on the way and fsynced with its directory before the function
that writes it returns; :mod:`actstore.engine.commit` then publishes the
manifest that names them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import google_crc32c
import numpy as np

from actstore.engine.read.compressed import ChunkEncoder
from actstore.engine.read.snapshot import key_prefixes
from actstore.engine.write.index_order import stable_order
from actstore.engine.write.keyset import KeySet
from actstore.format.arrays import array_metadata, chunk_path, inner_rows_for, shard_layout
from actstore.format.documents import dumps
from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.fields import Field
from actstore.format.layout import (
    FIELDS_DIR,
    INDEXES_DIR,
    SEGMENTS_DIR,
    VIEW_ITEM_KEY,
    VIEW_ROW,
    VIEWS_DIR,
    field_arrays,
    field_is_group,
    view_arrays,
)
from actstore.format.manifest import KEY_BYTES, SEGMENT_ATTR, IndexRunInfo, SegmentInfo, ViewInfo, group_document
from actstore.storage import files as fsio
from actstore.storage.checksum import RELEASE_BYTES, CheckedFile, checksum, new_hasher

__all__ = ["PendingView", "SegmentWriter", "ShardFile", "write_index_run", "write_object", "write_view"]

#: A write at least this large is hashed on a helper thread while this thread writes it.
PARALLEL_HASH_BYTES = 1 << 20
#: Start write-back (``fdatasync`` on a helper thread) whenever this much data has been written
#: since the last start, so that the disk works while rows arrive and commit's fsync finds
#: little left to do.  It also keeps the dirty pages of a long append bounded.
WRITEBACK_BYTES = 64 << 20


# --- durable file primitives ---------------------------------------------------


def file_record(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "blake3": checksum(data)}


# --- shard files ----------------------------------------------------------------


class ShardFile:
    """Streams rows into the single shard file of one array.

    Rows go to the file as they arrive, in whole 2 MiB ranges (a
    :class:`~actstore.storage.files.HugePageFile`: the page cache then maps by
    huge pages; the OS buffers them);
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
        self._hash = new_hasher()
        self._rel = chunk_path(len(inner_shape) + 1)

    def write(self, rows: np.ndarray, hasher: ThreadPoolExecutor | None = None,
              source: CheckedFile | None = None) -> int:
        """Append ``rows``; returns the bytes written.

        With ``hasher``, a large write is hashed there while this thread writes it
        (BLAKE3 and the copy into the page cache then use two cores); both are
        done when this returns, so the caller may reuse ``rows`` at once.
        ``source``: ``rows`` are a range of that committed file's map (a
        compaction), and are fed to its check on the way (:meth:`CheckedFile.consume`).
        """
        if not len(rows):
            return 0
        if self._file is None:
            os.makedirs(os.path.join(self.directory, os.path.dirname(self._rel)), exist_ok=True)
            self._file = fsio.HugePageFile(os.path.join(self.directory, self._rel))
        at = source.offset_of(rows) if source is not None else 0
        data = memoryview(np.ascontiguousarray(rows)).cast("B")  # type: ignore[arg-type]
        self.rows += len(rows)
        if self._encoder is not None:
            if source is not None:
                source.consume(at, data)
            return self._write_frames(self._encoder.feed(data))
        feed = partial(self._feed, data, source, at)
        if hasher is not None and data.nbytes >= PARALLEL_HASH_BYTES:
            hashed = hasher.submit(feed)
            try:
                self._file.write(data)
            finally:
                hashed.result()
        else:
            self._file.write(data)
            feed()
        return data.nbytes

    def _feed(self, data: memoryview, source: CheckedFile | None, at: int) -> None:
        """Hash ``data`` into this file's checksum, and into its source's check (the same bytes).

        With a source, a range of :data:`RELEASE_BYTES` at a time, into both, so that the source's check
        can drop each range from its map once both hashed it (a merge keeps only that range mapped in)."""
        if source is None:
            self._hash.update(data)
            return
        for a in range(0, len(data), RELEASE_BYTES):
            part = data[a : a + RELEASE_BYTES]
            self._hash.update(part)
            source.consume(at + a, part)

    def copy(self, rows: np.ndarray, source: CheckedFile, hasher: ThreadPoolExecutor | None = None) -> int:
        """Append ``rows``, a range of committed file ``source``'s read-only map; returns the bytes written.

        Written from the map like any rows (:meth:`write`: whole 2 MiB ranges straight
        from it, so that the merged file's page cache is in huge folios and its
        map reads as fast as a one-commit store's; the kernel's
        ``os.copy_file_range`` left small folios, and the merged segment read
        random rows at 0.55–0.8× a one-commit store), while ``hasher`` hashes the
        same bytes of the map twice: into ``source``'s check (compared with its
        record when the caller finishes it, before anything is published) and
        into this file's checksum.
        """
        return self.write(rows, hasher, source)

    def _write_frames(self, frames: list[bytes]) -> int:
        for frame in frames:
            self._file.write(frame)
            self._hash.update(frame)
        return sum(map(len, frames))

    def flush(self) -> int | None:
        """The file descriptor, for a write-back (None before the first write).

        Every whole 2 MiB range is with the kernel already; the bytes of the
        unfinished one stay buffered until :meth:`finish` (see
        :class:`~actstore.storage.files.HugePageFile`)."""
        if self._file is None:
            return None
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
            for a in field_arrays(name, f):
                self.arrays[a.key] = ShardFile(os.path.join(self.path, *a.rel.split("/")), a.inner, a.numpy, a.zarr,
                                               a.codec, chunk_bytes)
            if f.ragged:
                self.arrays[name + "/offsets"].write(np.zeros(1, i64))
                self.value_counts[name] = 0

    def write(self, keys: np.ndarray, columns: Mapping[str, Any], *, maps: bool = False,
              sources: Mapping[str, CheckedFile] | None = None) -> None:
        """Write validated rows (see :func:`actstore.engine.write.validate.validate_batch`).

        ``columns[name]`` is a fixed field's rows or a ragged field's ``(values, lengths)``
        in storage form; ``columns[name + "/scales"]`` a quantised field's scales.
        ``sources`` (a compaction): array name (``"keys"``, a field's name, ``name + "/scales"``)
        → the committed file those rows are a range of; each range is fed to
        that file's check as it is written (:class:`~actstore.storage.checksum.CheckedFile`),
        and the keys are not added to :attr:`keys_seen` (they are committed
        already).  ``maps``: copy those ranges by file range where possible
        (:meth:`ShardFile.copy`).
        """
        if self._writeback is not None and self._writeback.done():
            self._end_writeback()  # raises the error of a failed write-back
        if self._hasher is None and any(
                (columns[n][0] if f.ragged else columns[n]).nbytes >= PARALLEL_HASH_BYTES for n, f in self.fields.items()):
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="actstore-hash")
        prefixes = key_prefixes(keys)
        src: Mapping[str, CheckedFile] = sources or {}
        # The key set is updated on the helper thread too, while this one writes.
        added: Future[None] | None = None
        if sources is None:
            if self._hasher is not None:
                added = self._hasher.submit(self.keys_seen.add, keys)
            else:
                self.keys_seen.add(keys)

        def put(key: str, rows: np.ndarray, hasher: ThreadPoolExecutor | None) -> int:
            shard, source = self.arrays[key], src.get(key)
            if maps and source is not None:
                return shard.copy(rows, source, hasher)
            return shard.write(rows, hasher, source)

        written = 0
        try:
            for name, f in self.fields.items():
                col = columns[name]
                if f.ragged:
                    values, lengths = col
                    offsets = self.value_counts[name] + np.cumsum(lengths, dtype=np.int64)
                    written += put(name, values, self._hasher)
                    written += self.arrays[name + "/offsets"].write(offsets)
                    self.value_counts[name] += int(len(values))
                else:
                    written += put(name, col, self._hasher)
                if f.quantize is not None:
                    written += put(name + "/scales", columns[name + "/scales"], None)
            written += put("keys", keys, self._hasher if maps else None)
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
        groups = [FIELDS_DIR] + [f"{FIELDS_DIR}/{n}" for n, f in self.fields.items() if field_is_group(f)]
        for g in groups:
            doc = group_document()
            fsio.write_durable(os.path.join(self.path, g, "zarr.json"), doc)
            files[f"{g}/zarr.json"] = file_record(doc)
            fsio.fsync_dir(os.path.join(self.path, g))
        meta = group_document({SEGMENT_ATTR: {"rows": self.rows, "values": self.value_counts, "files": files}})
        fsio.write_durable(os.path.join(self.path, "zarr.json"), meta)
        fsio.fsync_dir(self.path)
        fsio.fsync_dir(os.path.dirname(self.path))
        info = SegmentInfo(self.id, self.rows, dict(self.value_counts), checksum(meta))
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
    return IndexRunInfo(obj_id, rows, checksum(meta))


def write_index_run(root: str, prefixes: np.ndarray, rows: np.ndarray | None = None, *,
                    first_row: int = 0) -> IndexRunInfo:
    """Write a key-index run.  ``rows`` None: the rows ``first_row, first_row + 1, ...`` whose keys have
    ``prefixes``, sorted here (equal prefixes in row order); else ``prefixes`` ascending already, with
    their global ``rows``."""
    if rows is None:
        rows, prefixes = stable_order(prefixes)
        rows += first_row  # (in place: the rows, in the prefixes' order)
    return write_object(root, INDEXES_DIR, {"prefix": (prefixes, "uint64"), "row": (rows, "int64")})


@dataclass(frozen=True)
class PendingView:
    """A view to record with the next commit: position -> row, and optionally columns per position (FORMAT.md §8).

    ``data`` holds each column in storage form (as
    :func:`~actstore.engine.write.validate.validate_batch` returns it: a fixed
    column's ``(n, *shape)`` array, a ragged one's ``(values, lengths)``);
    ``item_key`` the ``(n, 32)`` uint8 key of each position's input, or None.
    """

    rows: np.ndarray
    columns: Mapping[str, Field] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    item_key: np.ndarray | None = None


def write_view(root: str, view: PendingView) -> ViewInfo:
    """Write a view object: ``row``, and in version 3 ``item_key`` and the columns laid out as segment fields.

    A view without columns is written as before version 3 (one ``row`` array).
    Every array is one inner chunk (views are read whole, through maps).
    """
    if not view.columns and view.item_key is None:
        info = write_object(root, VIEWS_DIR, {VIEW_ROW: (view.rows, "int64")})
        return ViewInfo(info.id, info.rows, info.meta)
    obj_id = uuid.uuid4().hex
    path = os.path.join(root, VIEWS_DIR, obj_id)
    os.mkdir(path)
    n = len(view.rows)
    arrays: dict[str, np.ndarray] = {VIEW_ROW: view.rows}
    if view.item_key is not None:
        arrays[VIEW_ITEM_KEY] = view.item_key
    values: dict[str, int] = {}
    for name, f in view.columns.items():
        col = view.data[name]
        if f.ragged:
            flat, lengths = col
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            arrays[name], arrays[name + "/offsets"], values[name] = flat, offsets, int(len(flat))
        else:
            arrays[name] = col
    files: dict[str, Any] = {}
    for a in view_arrays(view.columns, view.item_key is not None):
        data = arrays[a.key]
        shard = ShardFile(os.path.join(path, *a.rel.split("/")), a.inner, a.numpy, a.zarr)
        shard.write(data)
        for rel, rec in shard.finish(max(1, len(data)) * max(1, shard.row_bytes)).items():
            files[f"{a.rel}/{rel}"] = rec
    if view.columns:
        for g in [FIELDS_DIR] + [f"{FIELDS_DIR}/{c}" for c, f in view.columns.items() if field_is_group(f)]:
            doc = group_document()
            fsio.write_durable(os.path.join(path, g, "zarr.json"), doc)
            files[f"{g}/zarr.json"] = file_record(doc)
            fsio.fsync_dir(os.path.join(path, g))
    meta = group_document({SEGMENT_ATTR: {"rows": n, "values": values, "files": files}})
    fsio.write_durable(os.path.join(path, "zarr.json"), meta)
    fsio.fsync_dir(path)
    fsio.fsync_dir(os.path.dirname(path))
    return ViewInfo(obj_id, n, checksum(meta), dict(view.columns), values, view.item_key is not None)
