"""``cache_dir=False``: a remote store's rows read through zarr-python, with no local chunk cache.

Every gather asks zarr-python (``zarr.open_array`` over an fsspec store) for the
rows it needs — a few HTTP range requests each time, through Zarr's sharding
codec.  Slow (see benchmarks/results/scaling.md) but correct, and no segment
data touches the local disk.  Everything here always copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CorruptStoreError
from .format import SEGMENTS_DIR, Field
from .reader import SegmentReader

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


class ZarrRows:
    """An array whose rows are read by zarr-python on each access (indexing and ``np.take``).  Always copies.

    Other numpy functions read the whole array first.
    """

    def __init__(self, arr: Any, dtype: np.dtype[Any]) -> None:
        self.arr = arr
        self.dtype = dtype
        self.shape = tuple(int(d) for d in arr.shape)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple) and len(key) == 2 and key[1] is Ellipsis:
            key = key[0]
        if isinstance(key, slice):
            key = slice(*(None if v is None else int(v) for v in (key.start, key.stop, key.step)))
        elif isinstance(key, np.integer):
            key = int(key)
        return np.asarray(self.arr[key], self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.arr[...], dtype or self.dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.take:
            return self._take(*args, **kwargs)

        def conv(x: Any) -> Any:
            return np.asarray(x) if isinstance(x, ZarrRows) else x

        return func(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})

    def _take(self, a: Any, indices: Any, axis: int | None = None, out: np.ndarray | None = None,
              mode: str = "raise") -> np.ndarray:
        if axis != 0:
            return np.take(np.asarray(self), indices, axis=axis, out=out, mode=mode)  # type: ignore[call-overload,no-any-return]
        idx = np.asarray(indices, np.int64)
        flat = idx.reshape(-1)
        if mode == "wrap":
            flat = flat % self.shape[0]
        elif mode == "clip":
            flat = np.clip(flat, 0, self.shape[0] - 1)
        elif len(flat) and (flat.min() < -self.shape[0] or flat.max() >= self.shape[0]):
            raise IndexError("index out of range")
        uniq, inverse = np.unique(flat, return_inverse=True)
        if len(uniq):
            vals = np.asarray(self.arr.get_orthogonal_selection((uniq,) + (slice(None),) * (self.ndim - 1)), self.dtype)
        else:
            vals = np.empty((0, *self.shape[1:]), self.dtype)
        res = vals[inverse.reshape(-1)].reshape(idx.shape + self.shape[1:])
        if out is not None:
            out[...] = res
            return out
        return res
