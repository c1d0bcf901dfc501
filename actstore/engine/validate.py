"""Checking and converting a batch before anything of it is written.

:func:`validate_batch` either returns the whole batch in storage form or raises
``TypeError``/``ValueError``; nothing is written before it returns, so a bad
batch never leaves part of itself in the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from actstore.engine.ragged import RaggedBatch
from actstore.engine.reader import normalize_keys
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.quantize import quantize

__all__ = ["field_of", "validate_batch"]

Column = "np.ndarray | tuple[np.ndarray, np.ndarray]"


def field_of(row: Any, *, ragged: bool = False, dtype: Any = None, compression: str | None = None,
             quantize: str | None = None) -> Field:
    """The :class:`Field` that stores rows like ``row`` (one row: a tensor or array; Python scalars are shape ``()``).

    The one place a field is inferred from data.  ``ragged``: the row's first
    dimension varies between rows (tokens).  ``dtype`` replaces a floating
    dtype (the store dtype); float64 is stored as float32.  ``quantize``
    applies to floating rows only (others are stored as they are).  Raises
    ``TypeError`` for a dtype no field can hold.
    """
    dt: Any
    if isinstance(row, torch.Tensor):
        shape, dt, floating = tuple(row.shape), row.dtype, row.is_floating_point()
    else:
        arr = np.asarray(row)
        shape, dt, floating = arr.shape, arr.dtype, arr.dtype.kind == "f"
    if dtype is not None and floating:
        name = dtype_name(dtype)
    else:  # float64 has no field dtype: stored as float32
        name = "float32" if dt in (torch.float64, np.dtype("float64")) else dtype_name(dt)
    out: tuple[int | None, ...] = shape
    if ragged:
        if not shape:
            raise TypeError("a ragged field needs rows of at least one dimension (the varying one)")
        out = (None, *shape[1:])
    return Field(out, name, compression=compression, quantize=quantize if floating else None)


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise TypeError(f"{where}: cannot convert {type(value).__name__} to an array ({e})") from e
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{where}: expected numbers, got an array of {arr.dtype}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "b"
    if dtype.is_floating_point:
        return "f"
    if dtype.is_complex:
        return "c"
    return "i"


def _check_kind(t: torch.Tensor, field: Field, where: str) -> tuple[str, str]:
    src, dst = _kind(t.dtype), _kind(field.spec.torch)
    allowed = {"b": {"b"}, "i": {"i", "f"}, "f": {"f"}}
    if dst not in allowed.get(src, set()):
        raise ValueError(
            f"{where}: cannot store {t.dtype} values in a {field.dtype} field without losing their meaning; "
            f"convert them yourself first (for example tensor.to(torch.{field.dtype}))"
        )
    return src, dst


def _store(t: torch.Tensor, field: Field, where: str, allow_nonfinite: bool, out: dict[str, Any], name: str,
           lengths: np.ndarray | None = None) -> None:
    """Put ``t`` (rows, or a ragged field's elements) into ``out`` in storage form (quantised when the field is)."""
    scheme = field.scheme
    if scheme is None:
        stored = _cast(t, field, where, allow_nonfinite)
    else:  # NaN/inf are refused whatever allow_nonfinite says: codes cannot hold them (FORMAT.md §4.1)
        _check_kind(t, field, where)
        stored, out[name + "/scales"] = quantize(t, scheme, where)
    out[name] = stored if lengths is None else (stored, lengths)


def _cast(t: torch.Tensor, field: Field, where: str, allow_nonfinite: bool) -> np.ndarray:
    """Cast to the field's dtype under 'same kind' rules and return storage bytes."""
    src, dst = _check_kind(t, field, where)
    if src == "i" and dst == "i" and t.numel() and t.dtype != field.spec.torch:
        info = torch.iinfo(field.spec.torch)
        arr = t.numpy()  # torch has no min/max for uint16/32/64 tensors; numpy does
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{where}: values in [{lo}, {hi}] do not fit {field.dtype} [{info.min}, {info.max}]")
    out = t.to(field.spec.torch)
    if not allow_nonfinite and dst == "f" and out.numel() and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"{where}: {bad} values are NaN or infinite (after casting to {field.dtype}); "
                         "pass allow_nonfinite=True to store them as they are")
    if field.dtype == "bfloat16":
        return out.contiguous().view(torch.int16).numpy().view(np.uint16)
    return out.contiguous().numpy()


def _check_shape(shape: tuple[int, ...], want: tuple[int, ...], where: str, what: str) -> None:
    if tuple(shape) != want:
        raise ValueError(f"{where}: expected {what} shape {want}, got {tuple(shape)}")


def validate_batch(
    fields: Mapping[str, Field], keys: object, values: Mapping[str, Any], *, allow_nonfinite: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Check ``keys`` and ``values`` against ``fields``; return them in storage form.

    Fixed fields become ``(n, *shape)`` arrays of the storage dtype; ragged fields
    become ``(values, lengths)``; a quantised field's values are its codes, and
    ``out[name + "/scales"]`` its scales.  Never writes anything.

    Raises
    ------
    TypeError, ValueError
        Naming the field, what was expected and what arrived.
    """
    karr = normalize_keys(keys)
    n = len(karr)
    if not isinstance(values, Mapping):
        raise TypeError(f"values: expected a dict of field name -> batch, got {type(values).__name__}")
    missing, extra = set(fields) - set(values), set(values) - set(fields)
    if missing or extra:
        raise ValueError(
            f"values: fields must be exactly {sorted(fields)}; missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    out: dict[str, Any] = {}
    for name, f in fields.items():
        where = f"values[{name!r}]"
        v = values[name]
        if f.ragged:
            flat, lengths = _ragged(v, f, n, where)
            _store(flat, f, where, allow_nonfinite, out, name, lengths)
        else:
            t = _as_tensor(v, where)
            _check_shape(t.shape, (n, *f.inner_shape), where, "batch")
            _store(t, f, where, allow_nonfinite, out, name)
    return karr, out


def _ragged(v: Any, f: Field, n: int, where: str) -> tuple[torch.Tensor, np.ndarray]:
    if isinstance(v, RaggedBatch):
        flat, lengths = v.values.detach().cpu(), v.lengths.numpy()
    elif isinstance(v, (list, tuple)):
        rows: Sequence[torch.Tensor] = [_as_tensor(r, f"{where}[{i}]") for i, r in enumerate(v)]
        for i, r in enumerate(rows):
            if r.ndim != len(f.shape) or tuple(r.shape[1:]) != f.inner_shape:
                raise ValueError(f"{where}[{i}]: expected a row of shape (length, {', '.join(map(str, f.inner_shape))})"
                                 f" — got {tuple(r.shape)}")
        lengths = np.array([len(r) for r in rows], np.int64)
        dtypes = {r.dtype for r in rows if r.numel()}  # an empty row ([] is float64) has no say
        if len(dtypes) > 1:
            raise ValueError(f"{where}: rows have different dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else f.spec.torch
        flat = torch.cat([r.to(dtype) for r in rows]) if rows else torch.empty((0, *f.inner_shape), dtype=dtype)
    else:
        raise TypeError(f"{where}: a ragged field takes a list of per-row arrays or an actstore.RaggedBatch, "
                        f"got {type(v).__name__}")
    if len(lengths) != n:
        raise ValueError(f"{where}: {len(lengths)} rows for {n} keys")
    _check_shape(tuple(flat.shape[1:]), f.inner_shape, where, "element")
    return flat, lengths
