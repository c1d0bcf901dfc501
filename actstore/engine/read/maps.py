"""Memory maps of committed files: :func:`map_rows`, the read path's one zero-copy function, and its checks.

Every committed array that actstore reads without a copy is mapped here: a
segment's shard file (:func:`map_rows`, called by
:class:`~actstore.engine.read.snapshot.SegmentReader`), or a small object's
array (:func:`map_object_array`: key-index runs and views).  Before a file is
mapped its size is checked, links are refused (:func:`check_no_links`), and
with ``verify_reads=True`` its bytes are checked against the commit
(:class:`ReadCheck`).
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import Any

import numpy as np

from actstore.errors import CorruptStoreError
from actstore.format.arrays import chunk_path
from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.layout import VIEWS_DIR
from actstore.format.manifest import IndexRunInfo
from actstore.storage.base import FileProvider
from actstore.storage.checksum import hash_file
from actstore.storage.files import expect_array, inside, object_files

__all__ = ["ReadCheck", "check_no_links", "data_file_size", "map_object_array", "map_range", "map_rows",
           "map_view", "wanted_files"]


def data_file_size(path: str) -> int:
    """Size of a data file that must exist and be a regular file (else :class:`CorruptStoreError`)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CorruptStoreError(f"{path}: data file is missing") from e
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStoreError(f"{path}: not a regular file")
    return int(st.st_size)


def map_rows(path: str, rows: int, inner_shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Map the first ``rows`` rows of a shard file as an array.  Never copies.

    The map is private and copy-on-write (``MAP_PRIVATE``): writing to the array,
    or to a tensor made from it with ``torch.from_numpy``, changes a private copy
    of the page and never the file, and PyTorch sees a writable buffer (no
    non-writable warning).

    SAFETY: every view of the result holds a reference to the ``mmap`` object, so
    the mapping stays valid while any view is alive, even after the store is
    closed or its files are deleted.  The file size is checked before mapping, so
    a short file raises :class:`CorruptStoreError` rather than ``SIGBUS``; a file
    truncated by another program *after* it was mapped can still kill the process
    with ``SIGBUS`` when the missing pages are touched — no mmap-based reader can
    prevent that, and it is outside actstore's guarantees (``verify`` detects it).
    """
    if rows == 0:
        return np.empty((0, *inner_shape), dtype)
    need = rows * int(np.prod(inner_shape, dtype=np.int64)) * dtype.itemsize
    size = data_file_size(path)
    if size < need:
        raise CorruptStoreError(f"{path}: file is {size} bytes, shorter than the {need} bytes its rows need")
    try:
        mm = np.memmap(path, dtype=dtype, mode="c", shape=(rows, *inner_shape))
    except FileNotFoundError as e:  # deleted since the stat (a superseded index run or view)
        raise CorruptStoreError(f"{path}: data file is missing") from e
    return mm.view(np.ndarray)  # drop the memmap subclass: plain ndarray indexing is faster


def map_range(array: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) where the bytes of ``array`` lie, when it is a C-contiguous map from :func:`map_rows`
    or a view of one; None for anything else.  What a copy of the rows by file range needs (compaction)."""
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        return None
    base: Any = array
    while base is not None and not (isinstance(base, np.memmap) and isinstance(base.base, mmap.mmap)):
        base = base.base if isinstance(base, np.ndarray) else None  # down to the array np.memmap made over its mmap
    if base is None or not isinstance(base.filename, str):
        return None
    start = array.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if start < 0 or start + array.nbytes > base.nbytes:
        return None
    return base.filename, int(base.offset) + start


def check_no_links(root: str, path: str) -> None:
    """Refuse ``path`` if any part of it below ``root`` is a symbolic link.

    A store never contains links; following one could read outside the store.
    """
    while len(path) > len(root):
        if os.path.islink(path):
            raise CorruptStoreError(f"{path}: is a symbolic link; stores never contain links (not following it)")
        path = os.path.dirname(path)


class ReadCheck:
    """``verify_reads=True``: check each file against its commit when it is first mapped.

    The object's ``zarr.json`` must have the BLAKE3 the manifest names, the
    array's ``zarr.json`` must describe exactly the rows the manifest says, and
    the data file must have the size and BLAKE3 recorded in the object's
    metadata.  Each file is hashed once per store handle (committed files never
    change); bytes changed after that are not noticed.
    """

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any]] = {}
        self._checked: set[str] = set()

    def __call__(self, base: str, meta: str, rel: str, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any],
                 codec: Any = None) -> None:
        data = f"{rel}/{chunk_path(len(inner) + 1)}"
        if f"{base}/{data}" in self._checked:
            return
        try:
            files = self._files.get(base)
            if files is None:
                files = self._files[base] = object_files(base, meta, base)[1]
            expect_array(base, rel, rows, inner, dtype.name, files, codec)  # zdtype == numpy name for stored dtypes
            for name in (f"{rel}/zarr.json", data) if rows else (f"{rel}/zarr.json",):
                path, rec = inside(base, name), files[name]
                size = os.stat(path).st_size
                if size != rec["size"] or hash_file(path, size) != rec["blake3"]:
                    raise CorruptStoreError(f"{path}: checksum mismatch (the bytes on disk changed since the commit)")
        except OSError as e:
            raise CorruptStoreError(f"{base}/{rel}: cannot read ({e.strerror or e})") from e
        self._checked.add(f"{base}/{data}")


def wanted_files(rel: str, rows: int, inner: tuple[int, ...], codec: Any, check: ReadCheck | None) -> list[str]:
    """The files of array ``rel`` that mapping it reads (what a file provider must make present)."""
    names = [f"{rel}/{chunk_path(len(inner) + 1)}"] if rows else []
    if check is not None or (codec is not None and rows):  # a compressed array's reader reads its zarr.json
        names.append(f"{rel}/zarr.json")
    return names


def map_object_array(root: str, directory: str, info: IndexRunInfo, name: str, zdtype: str,
                     check: ReadCheck | None = None, provide: FileProvider | None = None) -> np.ndarray:
    """Map one 1-D array of a small object (index run or view).  Never copies."""
    base = os.path.join(root, directory, info.id)
    path = os.path.join(base, name, "c", "0")
    check_no_links(root, path)
    if provide is not None:
        provide(base, info.meta, wanted_files(name, info.rows, (), None, check))
    if check is not None:
        check(base, info.meta, name, info.rows, (), INTERNAL_DTYPES[zdtype])
    return map_rows(path, info.rows, (), INTERNAL_DTYPES[zdtype])


def map_view(root: str, info: IndexRunInfo, check: ReadCheck | None = None,
             provide: FileProvider | None = None) -> np.ndarray:
    """Map a committed view: an int64 array of rows (-1 where a row is missing).  Never copies."""
    return map_object_array(root, VIEWS_DIR, info, "row", "int64", check, provide)
