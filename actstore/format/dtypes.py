"""The dtypes a field can hold (docs/FORMAT.md §3): their numpy, torch and Zarr v3 names, in one table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DTYPES", "INTERNAL_DTYPES", "DType", "dtype_name"]


@dataclass(frozen=True, slots=True)
class DType:
    name: str
    numpy: np.dtype[Any]  # storage dtype (little-endian)
    torch: torch.dtype
    zarr: str  # Zarr v3 data_type


def _dt(name: str, np_name: str, t: torch.dtype, zarr: str | None = None) -> DType:
    return DType(name, np.dtype(np_name), t, zarr or name)


#: Supported field dtypes.  bfloat16 has no Zarr v3 core type: it is stored as
#: ``uint16`` (the raw bit pattern) and the field's dtype says how to view it.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("float32", "<f4", torch.float32),
        _dt("float16", "<f2", torch.float16),
        _dt("bfloat16", "<u2", torch.bfloat16, "uint16"),
        _dt("int8", "i1", torch.int8),
        _dt("int16", "<i2", torch.int16),
        _dt("int32", "<i4", torch.int32),
        _dt("int64", "<i8", torch.int64),
        _dt("uint8", "u1", torch.uint8),
        _dt("bool", "?", torch.bool),
    )
}
_TORCH_NAMES = {d.torch: d.name for d in DTYPES.values()}


def dtype_name(dtype: object) -> str:
    """Canonical dtype name for a string, numpy dtype or torch dtype.

    Raises
    ------
    TypeError
        If the dtype is not one a field can hold.
    """
    if isinstance(dtype, torch.dtype):
        name = _TORCH_NAMES.get(dtype)
    elif isinstance(dtype, str) and dtype in DTYPES:
        name = dtype
    else:
        try:  # numpy parses some strings itself ("f4,i8" even goes through ast.literal_eval): any failure is ours
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except Exception:  # noqa: BLE001 - TypeError, ValueError, SyntaxError, ... for a string numpy cannot read
            name = None
        if name not in DTYPES or name == "bfloat16":
            name = name if name in DTYPES else None
    if name is None:
        raise TypeError(
            f"dtype: unsupported field dtype {dtype!r}; expected one of {sorted(DTYPES)}"
        )
    return name


#: Zarr data types of the internal arrays (keys, offsets, index runs).
INTERNAL_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("u1"), "int64": np.dtype("<i8"), "uint64": np.dtype("<u8")}
