"""Checking and converting a batch before anything of it is written.

:func:`validate_batch` either returns the whole batch in storage form or raises
``TypeError``/``ValueError``; nothing is written before it returns, so a bad
batch never leaves part of itself in the store.

The range check of a narrowing cast lives here too (:func:`cast_overflow`,
:func:`clamp_finite`, :func:`overflow_error`), for ``append`` and for
precompute's writer thread alike: a cast to a floating dtype of smaller range
(float32 → float16, say) must never turn a finite value into ±inf silently.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.read.snapshot import normalize_keys
from actstore.engine.write.segments import PendingView
from actstore.errors import CastOverflowError
from actstore.format.documents import name_argument
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.quantize import quantize

__all__ = ["cast_overflow", "clamp_finite", "field_of", "overflow_error", "validate_batch"]

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


def _store(t: torch.Tensor, field: Field, where: str, allow: tuple[bool, bool], out: dict[str, Any], name: str,
           lengths: np.ndarray | None = None) -> None:
    """Put ``t`` (rows, or a ragged field's elements) into ``out`` in storage form (quantised when the field is).

    ``allow``: (allow_nonfinite, allow_overflow).
    """
    scheme = field.scheme
    if scheme is None:
        stored = _cast(t, field, where, *allow)
    else:  # NaN/inf are refused whatever allow_nonfinite says: codes cannot hold them (FORMAT.md §4.1)
        _check_kind(t, field, where)
        stored, out[name + "/scales"] = quantize(t, scheme, where)
    out[name] = stored if lengths is None else (stored, lengths)


def _cast(t: torch.Tensor, field: Field, where: str, allow_nonfinite: bool, allow_overflow: bool) -> np.ndarray:
    """Cast to the field's dtype under 'same kind' rules and return storage bytes.

    A cast to a floating dtype of smaller range that would turn finite values
    into ±inf raises :class:`CastOverflowError`, or with ``allow_overflow``
    clamps them to the dtype's largest finite magnitude.
    """
    src, dst = _check_kind(t, field, where)
    if dst == "f" and (big := cast_overflow(t, field.spec.torch)) is not None:
        if not allow_overflow:
            raise overflow_error(where, big, field.spec.torch, 'a field of dtype "{dtype}" in a new store')
        t = clamp_finite(t, field.spec.torch)
    if src == "i" and dst == "i" and t.numel() and t.dtype != field.spec.torch:
        info = torch.iinfo(field.spec.torch)
        arr = t.numpy()  # torch has no min/max for uint16/32/64 tensors; numpy does
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{where}: values in [{lo}, {hi}] do not fit {field.dtype} [{info.min}, {info.max}]")
    out = t.to(field.spec.torch)
    if src == "i" and dst == "f" and out.numel():
        _refuse_rounded_integers(t, out, field, where)
    if not allow_nonfinite and dst == "f" and out.numel() and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"{where}: {bad} values are NaN or infinite (after casting to {field.dtype}); "
                         "pass allow_nonfinite=True to store them as they are")
    if field.dtype == "bfloat16":
        return out.contiguous().view(torch.int16).numpy().view(np.uint16)
    return out.contiguous().numpy()


#: Significand bits of each floating storage dtype: integers up to 2**bits in magnitude are exact in it.
_SIGNIFICAND = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def _refuse_rounded_integers(t: torch.Tensor, out: torch.Tensor, field: Field, where: str) -> None:
    """Refuse integers that the cast to a float field rounded (int64 ``2**40 + 1`` is float32 ``2**40``).

    Integers within the significand are exact; only larger ones are compared, as Python ints (exactly).
    """
    arr = t.numpy().ravel()
    edge = 1 << _SIGNIFICAND[out.dtype]
    big = np.flatnonzero((arr > edge) | (arr < -edge)) if arr.dtype.kind == "i" else np.flatnonzero(arr > edge)
    if not len(big):
        return
    got = out.to(torch.float64).numpy().ravel()[big]
    wrong = [int(j) for j, v, g in zip(big.tolist(), arr[big].tolist(), got.tolist(), strict=True)
             if g != g or abs(g) == float("inf") or int(g) != v]
    if wrong:
        raise ValueError(
            f"{where}: integer {int(arr[wrong[0]])} is not exactly a {field.dtype} (it would be stored as "
            f"{float(got[big.tolist().index(wrong[0])]):.17g}; {len(wrong)} values would round): store integers in an "
            "int field, or cast them yourself where rounding is meant")


# -- the range check of a narrowing cast -------------------------------------------------
def narrows(src: Any, dst: torch.dtype) -> bool:
    """True when a value of dtype ``src`` (torch or numpy) can overflow floating ``dst``: ``dst``'s range is smaller."""
    if not dst.is_floating_point:
        return False
    if isinstance(src, torch.dtype):
        if src == torch.bool:
            return False
        top = torch.finfo(src).max if src.is_floating_point else torch.iinfo(src).max
    else:
        src = np.dtype(src)
        if src.kind not in "iuf":
            return False
        top = np.finfo(src).max if src.kind == "f" else np.iinfo(src).max
    return float(top) > torch.finfo(dst).max


def finite_extremes(x: Any) -> Any:
    """The smallest and largest finite value of ``x`` (a tensor or array), as two values of its dtype (0 for none).

    On the CPU: one min/max pass (numpy for arrays, ``torch.aminmax`` for
    tensors); only a batch holding NaN or ±inf pays a second pass over its
    finite values.  On another device: one pass over the finite values, with no
    host synchronisation (the result stays on the device).  Never changes ``x``.
    """
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return np.zeros(2, x.dtype)
        ext = np.array([x.min(), x.max()], x.dtype)
        if x.dtype.kind == "f" and not np.isfinite(ext).all():
            return finite_extremes(x[np.isfinite(x)])
        return ext
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no aminmax for these in torch)
        return torch.from_numpy(finite_extremes(x.cpu().numpy()))
    if x.numel() == 0:
        return torch.zeros(2, dtype=x.dtype, device=x.device)
    if x.device.type != "cpu" and x.is_floating_point():
        x = torch.where(torch.isfinite(x), x, 0)
    pair = torch.stack(torch.aminmax(x))
    if x.is_floating_point() and x.device.type == "cpu" and not bool(torch.isfinite(pair).all()):
        return finite_extremes(x[torch.isfinite(x)])
    return pair


def extremes_overflow(ext: Any, dtype: torch.dtype) -> float | None:
    """The larger magnitude of ``ext`` (:func:`finite_extremes`) if casting it to ``dtype`` gives ±inf, else None.

    Exact: a cast rounds monotonically, so the batch's extremes overflow if and
    only if some value of the batch does (float16 holds up to 65504, and values
    below 65520 round to it rather than to inf).
    """
    t = torch.from_numpy(np.asarray(ext)) if isinstance(ext, np.ndarray) else ext.cpu()
    if not t.is_floating_point():
        t = t.to(torch.float64)  # integers beyond 2**53 overflow float16 and bfloat16 either way
    if not bool(torch.isinf(t.to(dtype)).any()):
        return None
    return float(t.abs().max())


def cast_overflow(x: Any, dtype: torch.dtype) -> float | None:
    """The largest finite magnitude in ``x`` if casting ``x`` to ``dtype`` turns a finite value into ±inf, else None.

    NaN and ±inf already in ``x`` are not this check's business
    (``allow_nonfinite`` governs them).  One pass over ``x`` (see
    :func:`finite_extremes`); none when ``dtype`` holds every value of ``x``'s dtype.
    """
    return extremes_overflow(finite_extremes(x), dtype) if narrows(x.dtype, dtype) else None


def clamp_finite(x: Any, dtype: torch.dtype) -> Any:
    """``x`` with its finite values clamped to ``±finfo(dtype).max`` (NaN and ±inf kept).  Always copies.

    Casting the result to ``dtype`` gives the same values as casting ``x`` does,
    except that finite values which would overflow become ``±max`` instead of ±inf.
    """
    top = torch.finfo(dtype).max
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "iu":
            return np.clip(x, max(-int(top), np.iinfo(x.dtype).min), min(int(top), np.iinfo(x.dtype).max))
        return np.where(np.isfinite(x), np.clip(x, -top, top), x).astype(x.dtype, copy=False)
    if not x.is_floating_point():
        return x.clamp(-int(top), int(top))
    return torch.where(torch.isfinite(x), x.clamp(-top, top), x)


def overflow_error(where: str, magnitude: float, dtype: torch.dtype, fix: str,
                   bypass: str = "allow_overflow=True") -> CastOverflowError:
    """The error for finite values up to ``magnitude`` that a cast to ``dtype`` would turn into ±inf.

    ``fix`` says how to store the field in a wider dtype, ``{dtype}`` standing
    for the one named (``'store_dtype="{dtype}"'``); ``bypass`` how to pass the check.
    """
    top = torch.finfo(dtype).max
    wider = [w for w in ("bfloat16", "float32")
             if top < torch.finfo(getattr(torch, w)).max and magnitude < torch.finfo(getattr(torch, w)).max]
    holds = wider[0] if wider else "float32"
    return CastOverflowError(
        f"{where}: finite values up to {magnitude:.6g} in magnitude do not fit {str(dtype).removeprefix('torch.')} "
        f"(largest finite value {top:.6g}): the cast would store them as ±inf. Store the field as "
        f"{' or '.join(wider) or 'float32'}, which hold{'s' if len(wider) < 2 else ''} them "
        f"({fix.format(dtype=holds)}), or pass {bypass} to store them clamped to ±{top:.6g}")


def _check_shape(shape: tuple[int, ...], want: tuple[int, ...], where: str, what: str) -> None:
    if tuple(shape) != want:
        raise ValueError(f"{where}: expected {what} shape {want}, got {tuple(shape)}")


def validate_batch(
    fields: Mapping[str, Field], keys: object, values: Mapping[str, Any], *, allow_nonfinite: bool = True,
    allow_overflow: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Check ``keys`` and ``values`` against ``fields``; return them in storage form.

    Fixed fields become ``(n, *shape)`` arrays of the storage dtype; ragged fields
    become ``(values, lengths)``; a quantised field's values are its codes, and
    ``out[name + "/scales"]`` its scales.  Never writes anything.

    Raises
    ------
    TypeError, ValueError
        Naming the field, what was expected and what arrived.
    CastOverflowError
        A cast to the field's dtype would turn finite values into ±inf (unless ``allow_overflow``).
    """
    karr = normalize_keys(keys)
    allow = (allow_nonfinite, allow_overflow)
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
            _store(flat, f, where, allow, out, name, lengths)
        else:
            t = _as_tensor(v, where)
            _check_shape(t.shape, (n, *f.inner_shape), where, "batch")
            _store(t, f, where, allow, out, name)
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


def view_of(rows: np.ndarray, columns: Mapping[str, Any], fields: Mapping[str, Field], item_key: object) -> PendingView:
    """A view to commit: ``rows`` with ``columns`` checked and in storage form (FORMAT.md §8).

    A column's field is ``fields[name]``, or inferred from a fixed column's
    first value; view columns are stored raw (no compression or quantisation).
    Raises ``TypeError``/``ValueError`` naming the column.
    """
    n = len(rows)
    specs: dict[str, Field] = {}
    for name, col in columns.items():
        name_argument(name, "columns")
        f = fields.get(name)
        if f is None:
            if isinstance(col, (list, tuple)) or not hasattr(col, "shape"):
                raise TypeError(f"columns[{name!r}]: pass its field in fields= (only an array's field is inferred)")
            f = field_of(col[0] if len(col) else np.zeros(col.shape[1:], np.asarray(col).dtype))
        if f.compression is not None or f.quantize is not None:
            raise ValueError(f"fields[{name!r}]: a view column is stored raw; got {f} (drop compression and quantize)")
        specs[name] = f
    unknown = set(fields) - set(columns)
    if unknown:
        raise ValueError(f"fields names {sorted(unknown)}, which are not in columns ({sorted(columns)})")
    keys = np.zeros((n, 32), np.uint8) if item_key is None else item_key  # (validate_batch checks keys too)
    try:
        karr, data = validate_batch(specs, keys, columns)
    except (TypeError, ValueError) as e:
        raise type(e)(f"view columns: {e}") from e
    if len(karr) != n:
        raise ValueError(f"item_key: {len(karr)} keys for {n} positions")
    return PendingView(rows, specs, data, None if item_key is None else np.ascontiguousarray(karr))
