"""One memory map over the same array of several segments: a gather across segments as one ``take``.

A store between merges has a few segments, each field's rows in one shard file
per segment.  Gathering a batch from them used to cost a sort by segment, one
``take`` per segment into a bounce buffer and one ``take`` back into batch
order (0.34–0.43× a one-segment store in ``bench_store``).  Here the files are
mapped side by side into one reserved range of address space, each starting on
a boundary that is a multiple of both the row size and 2 MiB (so row ``r`` of
segment ``s`` is row ``r + shift[s]`` of one strided array, and the kernel can
still map each file by huge pages), and a batch is gathered with one
``searchsorted``, one add and one ``take`` straight into the output (numpy's range check included).

The space between two files stays reserved and inaccessible (``PROT_NONE``,
no memory behind it); a gather never reads it, because every row it takes is a
checked row of some segment.  Only the rows of a file that the store commits
are mapped (the file's size is checked first), so nothing beyond the end of a
file is ever touched.

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
_PROT_NONE, _PROT_READ = 0, 1
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

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return self.interface

    def __del__(self) -> None:
        if self._addr is not None and _libc is not None:
            _libc.munmap(self._addr, self._size)
            self._addr = None


class Joined:
    """A field's rows of several segments as one strided array.

    With ``seg = starts.searchsorted(rows, "right")`` (0 for a row below 0,
    ``s + 1`` for a row of segment ``s``, ``len(starts)`` for a row past the end),
    global row ``r`` is row ``r + shift[seg]`` of :attr:`array`; the first and
    last entries of ``shift`` send rows outside the store far outside the array,
    so numpy's own range check of :meth:`take` refuses them.
    """

    __slots__ = ("array", "shift")

    def __init__(self, array: np.ndarray, shift: np.ndarray) -> None:
        self.array = array
        self.shift = shift

    def take(self, seg: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Global ``rows`` (``seg`` as above) as a new array, in batch order.  Always copies, once.

        Raises ``IndexError`` for a row outside ``[0, total)`` (negative rows are refused, not counted from the end).
        """
        pos = self.shift[seg]
        pos += rows  # (in place: one temporary fewer, 0.7 µs of 14 for 256 rows of 768 bytes)
        return self.array.take(pos, 0)


def join(arrays: Sequence[np.ndarray], starts: Sequence[int]) -> Joined | None:
    """One map over ``arrays`` (each the whole of a segment's array, mapped by
    :func:`~actstore.engine.read.maps.map_rows`), or None when that cannot be done here (another
    platform, an array that is not a whole file map from offset 0, a failed mapping)."""
    if _libc is None or not arrays:
        return None
    first = arrays[0]
    inner, dtype = first.shape[1:], first.dtype
    row_bytes = int(np.prod(inner, dtype=np.int64)) * dtype.itemsize
    if row_bytes <= 0:
        return None
    files: list[tuple[str, int, int]] = []  # (path, bytes, rows)
    for a, lo, hi in zip(arrays, starts[:-1], starts[1:], strict=True):
        where = map_range(a) if isinstance(a, np.ndarray) else None
        if (where is None or where[1] != 0 or a.shape[1:] != inner or a.dtype != dtype
                or len(a) != hi - lo or not a.flags.c_contiguous):
            return None
        files.append((where[0], a.nbytes, len(a)))
    step = math.lcm(row_bytes, _ALIGN)
    if step > _MAX_STEP:  # (a row size with a large odd factor: page alignment only, no huge pages)
        step = math.lcm(row_bytes, mmap.PAGESIZE)
    offsets, end = [], 0
    for _, nbytes, _ in files:
        at = -(-end // step) * step
        offsets.append(at)
        end = at + nbytes
    data = sum(nbytes for _, nbytes, _ in files)
    if end > 2 * data + _MAX_STEP * len(files):
        return None  # the gaps would reserve far more address space than the data: keep the per-segment gather
    total_rows = -(-end // row_bytes)
    try:
        region = Region(max(end, 1))
        for (path, nbytes, _), at in zip(files, offsets, strict=True):
            if nbytes:
                region.map_file(path, at, nbytes)
    except OSError:
        return None  # (the partly built region is unmapped with it)
    region.interface = {"version": 3, "shape": (total_rows, *inner), "typestr": dtype.str,
                        "data": (region.start, True)}
    array = np.asarray(region)
    far = 1 << 62  # (rows outside the store: far outside the array, refused by take's range check)
    shift = np.array([-far, *(at // row_bytes - lo for at, lo in zip(offsets, starts[:-1], strict=True)), far],
                     np.int64)
    return Joined(array, shift)
