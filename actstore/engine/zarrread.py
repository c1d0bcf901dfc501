"""``cache_dir=False``: a remote store's rows read through zarr-python, with no local chunk cache.

Every gather asks zarr-python (``zarr.open_array`` over an fsspec store) for the
rows it needs — a few HTTP range requests each time, through Zarr's sharding
codec.  Slow (see benchmarks/results/scaling.md) but correct, and no segment
data touches the local disk.  Everything here always copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.engine.reader import SegmentReader
from actstore.engine.rows import CopiedRows
from actstore.errors import CorruptStoreError
from actstore.format.fields import Field
from actstore.format.layout import SEGMENTS_DIR

__all__ = ["ZarrRows", "ZarrSegmentReader"]


class ZarrSegmentReader(SegmentReader):
    """A segment read through zarr-python instead of memory maps (``cache_dir=False``).  Always copies."""

    __slots__ = ("zroot",)

    def __init__(self, zroot: Any, root: str, info: Any, fields: dict[str, Field]) -> None:
        super().__init__(root, info, fields, None)
        self.zroot = zroot

    def _map(self, rel: str, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any], codec: Any = None) -> Any:
        if rows == 0:
            return np.empty((0, *inner), dtype)
        import zarr

        where = f"{SEGMENTS_DIR}/{self.info.id}/{rel}"
        try:
            arr = zarr.open_array(store=self.zroot, path=where, mode="r")
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise CorruptStoreError(f"{where}: cannot open with zarr ({e})") from e
        if tuple(arr.shape) != (rows, *inner) or np.dtype(arr.dtype) != dtype:
            raise CorruptStoreError(f"{where}: zarr array is {arr.dtype}{tuple(arr.shape)}, the commit says "
                                    f"{dtype}{(rows, *inner)}")
        if rel.endswith("/offsets"):
            return np.asarray(arr[...], dtype)  # small, and checked whole by ragged()
        return ZarrRows(arr, dtype)


class ZarrRows(CopiedRows):
    """An array whose rows are read by zarr-python on each access (indexing and ``np.take``).  Always copies."""

    def __init__(self, arr: Any, dtype: np.dtype[Any]) -> None:
        self.arr = arr
        self.dtype = dtype
        self.shape = tuple(int(d) for d in arr.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.arr[start:stop], self.dtype)

    def take_rows(self, flat: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(flat, return_inverse=True)
        if not len(uniq):
            return np.empty((0, *self.shape[1:]), self.dtype)
        vals = np.asarray(self.arr.get_orthogonal_selection((uniq,) + (slice(None),) * (self.ndim - 1)), self.dtype)
        return vals[inverse.reshape(-1)]
