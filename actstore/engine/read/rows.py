"""Array-likes whose rows are read, and copied, on access (no memory map behind them).

The read path indexes segment arrays with ``a[i, ...]``, ``a[i:j]`` and
``np.take(a, rows, axis=0, out=..., mode=...)``.  A memory map does all that
natively; :class:`CopiedRows` gives the same surface to arrays that must be
decoded or fetched first (compressed fields, zarr-python reads of a remote
store).  Nothing more: other numpy functions raise ``TypeError`` (take
``np.asarray(a)``, the whole array, first), and so do keys other than an int,
a slice, ``(int, ...)`` or an array of row numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CopiedRows"]


class CopiedRows:
    """Base class: subclasses set ``shape``/``dtype`` and implement :meth:`rows` and :meth:`take_rows`."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (in range, ``start <= stop``) as a new array."""
        raise NotImplementedError

    def take_rows(self, flat: np.ndarray) -> np.ndarray:
        """The rows ``flat`` (1-D, in range, non-negative) as a new ``(len(flat), *row)`` array."""
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple) and len(key) == 2 and key[1] is Ellipsis:
            key = key[0]
        n = self.shape[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            return self.rows(start, max(start, stop)) if step == 1 else self.rows(0, n)[key]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of range for {n} rows")
            return self.rows(i, i + 1)[0, ...]  # a 0-d array for a scalar field, as a map's [i, ...] gives
        idx = np.asarray(key)
        if isinstance(key, tuple) or idx.dtype.kind not in "iu":
            raise TypeError(f"{type(self).__name__}: index rows with an int, a slice, (int, ...) or an integer array, "
                            f"got {type(key).__name__}" + (f" of {idx.dtype}" if not isinstance(key, tuple) else ""))
        return self._take(self, idx, axis=0)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.rows(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.take:
            return self._take(*args, **kwargs)
        return NotImplemented  # numpy raises TypeError; np.asarray(self) first gives the whole array

    def _take(self, a: Any, indices: Any, axis: int | None = None, out: np.ndarray | None = None,
              mode: str = "raise") -> np.ndarray:
        if axis != 0:
            return np.take(np.asarray(self), indices, axis=axis, out=out, mode=mode)  # type: ignore[call-overload,no-any-return]
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices: expected integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        flat = idx.reshape(-1)
        n = self.shape[0]
        if mode == "wrap":
            flat = flat % n
        elif mode == "clip":
            flat = np.clip(flat, 0, n - 1)
        elif len(flat) and (flat.min() < -n or flat.max() >= n):
            raise IndexError("index out of range")
        else:
            flat = np.where(flat < 0, flat + n, flat)
        res = self.take_rows(flat).reshape(idx.shape + self.shape[1:])
        if out is not None:
            out[...] = res
            return out
        return res
