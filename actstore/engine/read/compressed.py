"""Optional compression of field data: zstd inner chunks inside the Zarr shard.

A field created with ``compression="zstd"`` stores each inner chunk of its shard
as one zstd frame (Zarr v3 codecs ``bytes`` then ``zstd``; any Zarr v3 reader
decodes it).  This trades the zero-copy read path for disk space: rows are read
by decompressing whole inner chunks (:class:`CompressedRows`, which keeps a few
decoded chunks), so every read copies, and random access costs one chunk
decode per chunk touched.  Keys, offsets and indexes are never compressed.

The codec comes from numcodecs, which zarr-python itself uses for ``zstd``.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Any

import google_crc32c
import numpy as np

from actstore.engine.read.rows import CopiedRows
from actstore.errors import CorruptStoreError
from actstore.format.codecs import MAX_INNER_CHUNK_BYTES

__all__ = ["ChunkEncoder", "CompressedRows"]

_MAGIC = 0xFD2FB528
_EMPTY = 2**64 - 1  # a shard index entry for a chunk that was never written (all fill value)
#: A frame declaring more than this many times its own size is refused before decoding (zstd's
#: best case, a run of one byte, stays below ~45,000:1).
MAX_RATIO = 1 << 16


def _zstd(level: int = 3) -> Any:
    from numcodecs.zstd import Zstd  # a dependency of zarr

    return Zstd(level=level)


class ChunkEncoder:
    """Cuts a stream of row bytes into inner chunks of ``chunk_bytes`` and compresses each one."""

    def __init__(self, level: int, chunk_bytes: int) -> None:
        self.codec = _zstd(level)
        self.chunk_bytes = chunk_bytes
        self.sizes: list[int] = []  # compressed size of each chunk emitted
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, data: memoryview) -> list[bytes]:
        """Take ``data``; return the compressed chunks it completes."""
        out = []
        if self._pending:
            take = min(len(data), self.chunk_bytes - len(self._pending))
            self._pending += data[:take]
            data = data[take:]
            if len(self._pending) == self.chunk_bytes:
                out.append(self._emit(self._pending))
                self._pending = bytearray()
        while len(data) >= self.chunk_bytes:
            out.append(self._emit(data[: self.chunk_bytes]))
            data = data[self.chunk_bytes :]
        self._pending += data
        return out

    def flush(self, chunk_bytes: int | None = None) -> list[bytes]:
        """The last chunk, padded with zeros to a whole chunk (of ``chunk_bytes`` when given)."""
        if chunk_bytes is not None:
            self.chunk_bytes = chunk_bytes
        if not self._pending:
            return []
        self._pending += bytes(self.chunk_bytes - len(self._pending))
        chunk, self._pending = self._emit(self._pending), bytearray()
        return [chunk]

    def _emit(self, raw: Any) -> bytes:
        data = bytes(self.codec.encode(raw))
        self.sizes.append(len(data))
        return data


def frame_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame declares (RFC 8878, 3.1.1.1), or None if it declares none."""
    if len(frame) < 6 or struct.unpack_from("<I", frame)[0] != _MAGIC:
        raise ValueError("not a zstd frame")
    fhd = frame[4]
    single = (fhd >> 5) & 1
    fcs_flag = fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    size = (1 if single else 0) if fcs_flag == 0 else (2, 4, 8)[fcs_flag - 1]
    if not size:
        return None
    if len(frame) < pos + size:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(frame[pos : pos + size], "little")
    return value + 256 if size == 2 else value


class CompressedRows(CopiedRows):
    """Rows of a compressed single-shard array, decoded chunk by chunk.  Always copies.

    Supports what the read path uses: ``len``, ``shape``/``dtype``, indexing by
    int, slice or ``(int, ...)``, and ``np.take`` along axis 0.  Keeps the last
    few decoded chunks, so reading rows in order decodes each chunk once.
    """

    #: Decoded chunks kept per array.
    CACHE_CHUNKS = 4

    def __init__(self, path: str, rows: int, inner_shape: tuple[int, ...], dtype: np.dtype[Any],
                 inner_rows: int, size: int) -> None:
        self._file: Any = None
        self.path = path
        self.shape = (rows, *inner_shape)
        self.dtype = dtype
        self.inner_rows = inner_rows
        self.row_bytes = int(np.prod(inner_shape, dtype=np.int64)) * dtype.itemsize
        if not 1 <= inner_rows <= max(rows, 1) or inner_rows * self.row_bytes > MAX_INNER_CHUNK_BYTES:
            raise CorruptStoreError(f"{path}: inner chunks of {inner_rows} rows ({inner_rows * self.row_bytes:,} bytes) "
                                    f"for an array of {rows} rows: more than the format allows")
        n_inner = -(-rows // inner_rows)
        index_bytes = 16 * n_inner + 4
        if size < index_bytes:
            raise CorruptStoreError(f"{path}: {size} bytes is shorter than its {index_bytes}-byte shard index")
        with open(path, "rb") as f:
            f.seek(size - index_bytes)
            raw = f.read(index_bytes)
        if len(raw) != index_bytes:
            raise CorruptStoreError(f"{path}: file shorter than its metadata says")
        if google_crc32c.value(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            raise CorruptStoreError(f"{path}: shard index checksum (CRC32C) mismatch")
        index = np.frombuffer(raw[:-4], "<u8").reshape(n_inner, 2)
        written = index[:, 0] != _EMPTY
        end = index[written, 0] + index[written, 1]
        if (index[written, 1] == 0).any() or (end > size - index_bytes).any() or (end < index[written, 0]).any():
            raise CorruptStoreError(f"{path}: shard index points outside the file")
        self._index = index.astype(np.int64, copy=True)
        self._index[~written] = -1
        self._codec = _zstd()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("CompressedRows is per process; pickle the store instead")

    def chunk(self, c: int) -> np.ndarray:
        """Decoded inner chunk ``c`` as an (inner_rows, *inner_shape) array (shared: do not modify)."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        want = self.inner_rows * self.row_bytes
        offset, nbytes = (int(v) for v in self._index[c])
        if offset < 0:
            out = bytearray(want)  # never written: the fill value, zeros
        else:
            if self._file is None:
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed with the object
            frame = os.pread(self._file.fileno(), nbytes, offset)
            try:  # every size is checked before anything is allocated for the decoded chunk
                if len(frame) != nbytes or want > nbytes * MAX_RATIO or frame_content_size(memoryview(frame)) != want:
                    raise ValueError(f"the frame does not hold the {want} bytes of an inner chunk")
                out = bytearray(want)
                self._codec.decode(frame, out)  # never writes beyond `out`
            except (ValueError, RuntimeError) as e:
                raise CorruptStoreError(f"{self.path}: inner chunk {c} cannot be decoded ({e})") from e
        arr = np.frombuffer(out, self.dtype).reshape(self.inner_rows, *self.shape[1:])
        arr.flags.writeable = False
        self._cache[c] = arr
        if len(self._cache) > self.CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return arr

    def __del__(self) -> None:
        if self._file is not None:
            self._file.close()

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
        r = start
        while r < stop:
            c, within = divmod(r, self.inner_rows)
            n = min(stop - r, self.inner_rows - within)
            out[r - start : r - start + n] = self.chunk(c)[within : within + n]
            r += n
        return out

    def take_rows(self, flat: np.ndarray) -> np.ndarray:
        res = np.empty((len(flat), *self.shape[1:]), self.dtype)
        chunk_of = flat // self.inner_rows
        order = np.argsort(chunk_of, kind="stable")  # each chunk decoded once per call
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            c = int(chunk_of[group[0]])
            res[group] = self.chunk(c)[flat[group] - c * self.inner_rows]
        return res
