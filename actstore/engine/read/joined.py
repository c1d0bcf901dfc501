"""One memory map over the same array of several segments: a gather across segments as one ``take``.

A store between merges has a few segments, each field's rows in one shard file
per segment.  Gathering a batch from them used to cost a sort by segment, one
``take`` per segment into a bounce buffer and one ``take`` back into batch
order (0.34–0.43× a one-segment store in ``bench_store``).  Here the files are
mapped side by side into one reserved range of address space, each starting on
a boundary that is a multiple of both the row size and 2 MiB (so row ``r`` of
segment ``s`` is row ``r + shift[s]`` of one strided array, and the kernel can
still map each file by huge pages), and a batch is gathered with one
``take`` straight into the output (numpy's range check included).

Which shift a row takes is read from a small table indexed by the row's block
(``row >> bits``): a block of rows of one segment takes its segment's shift.  A
block holding rows of two segments (at most one per boundary) is copied once,
when the map is made, into anonymous memory of the same range, and its rows are
read there: so every row's position is ``row + table[row >> bits]``, a shift
and a ``take`` that the CPU predicts, where a ``searchsorted`` over the
segments' starts mispredicted a branch for most rows of a random batch (2.6 of
14 µs for 256 rows of 768 bytes).  Copies are at most :data:`_MAX_COPY` bytes a
boundary.

The space between two files stays reserved and inaccessible (``PROT_NONE``,
no memory behind it); a gather never reads it, because every row it takes is a
checked row of some segment.  Only the rows of a file that the store commits
are mapped (the file's size is checked first), so nothing beyond the end of a
file is ever touched.  Rows outside the store are refused by ``take``'s own
range checks (see :meth:`Joined.take`).

SAFETY: the arrays :func:`join` returns hold a reference to the :class:`Region`
that owns the address range; it is unmapped when the last of them is gone.
Their pages are mapped read-only: they are only ever read by ``take`` into a
new array, never handed to users.  Linux and other POSIX systems with
``MAP_FIXED``; anywhere else (or when any mapping fails) :func:`join` returns
None and the caller keeps its per-segment gather.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from actstore.engine.read.maps import map_range

__all__ = ["Joined", "Region", "join"]

#: File maps start on multiples of this (and of the row size) within the range: the kernel's huge page.
_ALIGN = 2 << 20
#: A larger multiple of the row size and 2 MiB falls back to page alignment (bounds the address space reserved).
_MAX_STEP = 64 << 20
#: The shift table has about this many blocks at most (8 bytes each: it stays in the CPU's caches) ...
_MAX_BLOCKS = 1 << 15
#: ... unless a block of this many bytes holds fewer than 2 rows; a block copied at a boundary is at most this large.
_MAX_COPY = 1 << 20
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0
_FAILED = ctypes.c_void_p(-1).value

_libc: Any = None
if os.name == "posix":
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.restype = ctypes.c_int
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mprotect.restype = ctypes.c_int
        _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # pragma: no cover - a libc without mmap
        _libc = None


class Region:
    """A reserved range of address space with files mapped into it; unmapped when garbage-collected.

    ``__array_interface__`` lets numpy view it without a copy, keeping the region
    alive as the array's base.
    """

    def __init__(self, nbytes: int) -> None:
        self._addr: int | None = None
        self._size = nbytes + _ALIGN  # (room to start on a 2 MiB boundary)
        addr = _libc.mmap(None, self._size, _PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if addr is None or addr == _FAILED:
            raise OSError(ctypes.get_errno(), "mmap: cannot reserve address space")
        self._addr = addr
        self.start = -(-addr // _ALIGN) * _ALIGN
        self.nbytes = nbytes
        self.interface: dict[str, Any] = {}

    def map_file(self, path: str, offset: int, nbytes: int) -> None:
        """Map the first ``nbytes`` of ``path`` (read-only, private) at ``offset`` bytes into the range."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < nbytes:
                raise OSError(f"{path}: shorter than the {nbytes} bytes its rows need")
            want = self.start + offset
            got = _libc.mmap(want, nbytes, _PROT_READ, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            if got is None or got == _FAILED or got != want:
                raise OSError(ctypes.get_errno(), f"mmap: cannot map {path} at its place")
        finally:
            os.close(fd)

    def map_copy(self, offset: int, data: np.ndarray) -> None:
        """Put a copy of ``data`` (C-contiguous) at ``offset`` bytes (a page boundary) into the range, read-only."""
        size = -(-data.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        want = self.start + offset
        got = _libc.mmap(want, size, _PROT_READ | _PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED,
                         -1, 0)
        if got is None or got == _FAILED or got != want:
            raise OSError(ctypes.get_errno(), "mmap: cannot map a copy at its place")
        ctypes.memmove(want, data.ctypes.data, data.nbytes)
        if _libc.mprotect(want, size, _PROT_READ) != 0:
            raise OSError(ctypes.get_errno(), "mprotect: cannot make a copy read-only")

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return self.interface

    def __del__(self) -> None:
        if self._addr is not None and _libc is not None:
            _libc.munmap(self._addr, self._size)
            self._addr = None


class Joined:
    """A field's rows of several segments as one strided array: global row ``r`` is row
    ``r + table[r >> bits]`` of :attr:`array` (see the module docstring)."""

    __slots__ = ("array", "bits", "table")

    def __init__(self, array: np.ndarray, table: np.ndarray, bits: int) -> None:
        self.array = array
        self.table = table
        self.bits = np.uint64(bits)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Global ``rows`` (a 1-D int64 array) as a new array, in batch order.  Always copies, once.

        Raises ``IndexError`` for a row outside ``[0, total)`` (negative rows are refused, not counted from
        the end): read as unsigned, a negative row's block is past the table (``bits`` is at least 1, so it
        stays a positive index), as is a row past the last block; a row past the end inside the last block
        lands past the end of :attr:`array`, which ends with the store's last row.
        """
        pos = self.table.take(rows.view(np.uint64) >> self.bits)
        pos += rows
        return self.array.take(pos, 0)


def _block_bits(total: int, row_bytes: int) -> int:
    """log2 of the rows a block of the shift table spans (at least 1: see :meth:`Joined.take`)."""
    for_table = max(1, (-(-total // _MAX_BLOCKS) - 1).bit_length())
    for_copy = max(1, (_MAX_COPY // row_bytes).bit_length() - 1)
    return min(for_table, for_copy)


def join(arrays: Sequence[np.ndarray], starts: Sequence[int]) -> Joined | None:
    """One map over ``arrays`` (each the whole of a segment's array, mapped by
    :func:`~actstore.engine.read.maps.map_rows`), or None when that cannot be done here (another
    platform, an array that is not a whole file map from offset 0, a failed mapping, no rows)."""
    if _libc is None or not arrays or starts[0] != 0 or starts[-1] <= 0:
        return None
    first = arrays[0]
    inner, dtype = first.shape[1:], first.dtype
    row_bytes = int(np.prod(inner, dtype=np.int64)) * dtype.itemsize
    if row_bytes <= 0:
        return None
    files: list[tuple[str, int]] = []  # (path, bytes)
    for a, lo, hi in zip(arrays, starts[:-1], starts[1:], strict=True):
        where = map_range(a) if isinstance(a, np.ndarray) else None
        if (where is None or where[1] != 0 or a.shape[1:] != inner or a.dtype != dtype
                or len(a) != hi - lo or not a.flags.c_contiguous):
            return None
        files.append((where[0], a.nbytes))
    total = int(starts[-1])
    bits = _block_bits(total, row_bytes)
    block = 1 << bits
    blocks = -(-total // block)
    begin = np.arange(blocks, dtype=np.int64) << bits
    at = np.asarray(starts, np.int64)
    seg_first = at.searchsorted(begin, "right") - 1  # the segment of each block's first row ...
    seg_last = at.searchsorted(np.minimum(begin + block, total) - 1, "right") - 1  # ... and of its last
    copied = np.flatnonzero(seg_first != seg_last).tolist()  # blocks across a boundary
    last = blocks - 1
    tail = bool(copied) and copied[-1] == last  # the last block is copied after the last file: the array ends there
    head = copied[:-1] if tail else copied  # the other copied blocks, side by side before the files

    step = math.lcm(row_bytes, _ALIGN)
    if step > _MAX_STEP:  # (a row size with a large odd factor: page alignment only, no huge pages)
        step = math.lcm(row_bytes, mmap.PAGESIZE)
    offsets, end = [], len(head) * block * row_bytes
    for _, nbytes in files:
        place = -(-end // step) * step if nbytes else end  # (an empty file is not mapped)
        offsets.append(place)
        end = place + nbytes
    tail_at = -(-end // step) * step
    end = tail_at + (total - (last << bits)) * row_bytes if tail else end
    data = sum(nbytes for _, nbytes in files)
    if end > 2 * data + _MAX_STEP * (len(files) + 2):
        return None  # the gaps would reserve far more address space than the data: keep the per-segment gather

    table = np.array([o // row_bytes for o in offsets], np.int64)[seg_first] - at[seg_first]
    for i, j in enumerate(head):
        table[j] = (i - j) * block
    if tail:
        table[last] = tail_at // row_bytes - (last << bits)
    length = int(table[last]) + total  # the last row's position + 1: the end of whatever holds the last block
    if length * row_bytes != end:
        raise AssertionError(f"joined map: the last row ends at byte {length * row_bytes}, the map at {end}")

    def rows_of(j: int) -> np.ndarray:
        """A copy of block ``j``'s rows, read from the segments' files (as the files' own maps read them: not
        from ``arrays``, whose private pages may hold writes into ``store[i]``'s views)."""
        lo, hi = j << bits, min((j + 1) << bits, total)
        parts = []
        for s in range(int(seg_first[j]), int(seg_last[j]) + 1):
            a, b = max(lo, starts[s]) - starts[s], min(hi, starts[s + 1]) - starts[s]
            items = (b - a) * (row_bytes // dtype.itemsize)
            part = np.fromfile(files[s][0], dtype, count=items, offset=a * row_bytes)
            if part.size != items:
                raise OSError(f"{files[s][0]}: shorter than the rows its map holds")
            parts.append(part)
        return np.concatenate(parts)

    try:
        region = Region(max(end, 1))
        if head:
            region.map_copy(0, np.concatenate([rows_of(j) for j in head]))
        for (path, nbytes), place in zip(files, offsets, strict=True):
            if nbytes:
                region.map_file(path, place, nbytes)
        if tail:
            region.map_copy(tail_at, rows_of(last))
    except OSError:
        return None  # (the partly built region is unmapped with it)
    region.interface = {"version": 3, "shape": (length, *inner), "typestr": dtype.str, "data": (region.start, True)}
    return Joined(np.asarray(region), table, bits)
