"""Scratch arrays backed by a deleted file: growing per-row bookkeeping kept out of anonymous memory.

A long precompute keeps a few numbers per dataset position (its content key,
its schedule code, its side values) until the final commit.  Held in numpy's
heap they are anonymous memory, which the kernel can only keep in RAM (or
swap); 10 million positions at ~100 bytes each would be a gigabyte.  A
:class:`ScratchArray` keeps them in a shared memory map of a file that was
deleted on creation (``tempfile.TemporaryFile``): its pages are page cache,
written back to the disk under memory pressure and dropped, never lost with
a crash (nothing is left behind: the file has no name) and never counted as
the process's anonymous memory.  Reads and writes cost what the same numpy
array's would while the pages are cached.

Growing never copies: the file is extended (``posix_fallocate``: a full disk
raises ``OSError`` there, never a ``SIGBUS`` at a later write into the map)
and mapped again whole; the old map stays valid for arrays taken from it
earlier (both maps show the same pages).  A directory where no file can be
created falls back to the heap.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["ScratchArray", "scratch_dir"]

_MIN_ROWS = 4096


def scratch_dir(path: str) -> str:
    """The directory nearest ``path`` that exists (``path`` itself, or its closest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            return tempfile.gettempdir()
        path = parent
    return path


class ScratchArray:
    """A growing array of ``dtype`` rows of shape ``inner``, in a deleted file's shared map under ``directory``.

    ``directory`` None keeps it in ordinary numpy memory instead (the same
    interface).  :attr:`data` is the whole capacity; :meth:`view` the first
    ``len(self)`` rows.  Both never copy and stay valid after a later growth,
    but do not show rows written after it: take them again.
    """

    def __init__(self, dtype: Any, inner: tuple[int, ...] = (), directory: str | None = None,
                 capacity: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.inner = tuple(inner)
        self.directory = directory
        self._row_bytes = self.dtype.itemsize * int(np.prod(self.inner, dtype=np.int64))
        self._file: Any = None
        self.n = 0
        self.data = np.empty((0, *self.inner), self.dtype)
        if capacity:
            self.reserve(capacity)

    def __len__(self) -> int:
        return self.n

    def view(self) -> np.ndarray:
        """The rows written so far (never copies)."""
        return self.data[: self.n]

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows in all (grows by at least half the capacity; never copies a file map)."""
        if rows <= len(self.data):
            return
        cap = max(rows, len(self.data) + len(self.data) // 2, _MIN_ROWS)
        nbytes = max(cap * self._row_bytes, 1)
        if self.directory is None:
            grown = np.empty((cap, *self.inner), self.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
            return
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".actstore-scratch-")  # noqa: SIM115
            except OSError:  # (a directory this process cannot write to: the heap, as with directory=None)
                self.directory = None
                self.reserve(rows)
                return
        # The space is allocated now (ENOSPC is an OSError here, never a SIGBUS on a later write to the map).
        have = os.fstat(self._file.fileno()).st_size
        os.posix_fallocate(self._file.fileno(), have, nbytes - have)
        mm = mmap.mmap(self._file.fileno(), nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.data = np.frombuffer(mm, self.dtype, count=cap * int(np.prod(self.inner, dtype=np.int64))).reshape(
            cap, *self.inner)

    def append(self, values: Any) -> None:
        """Copy ``values`` (``(m, *inner)``) after the rows written so far."""
        arr = np.asarray(values)
        m = len(arr)
        self.reserve(self.n + m)
        self.data[self.n : self.n + m] = arr
        self.n += m

    def close(self) -> None:
        """Let go of the file (its space returns once every array taken from it is gone)."""
        if self._file is not None:
            self._file.close()
            self._file = None
