"""Quantised fields: the schemes, and the two formulas (docs/FORMAT.md §4.1) in code.

A quantised field stores each row (each token of a ragged field) as small
codes ``q`` plus one float32 ``scale``; the value it stands for is::

    value = float32(q) * scale          (computed in float32, then rounded to the dtype read)

``int8``: ``q`` is an int8 in [-127, 127], ``scale = amax / 127``.
``float8_e4m3``: ``q`` is a ``float8_e4m3fn`` (stored as its uint8 bit pattern),
``scale = amax / 448`` (448 is the largest finite e4m3fn value).  ``amax`` is
the largest ``|x|`` of the row (token) in float32; an all-zero row has scale 0
and codes 0, and reads back as zeros.  NaN and ±inf cannot be quantised: a
batch holding any is refused before anything of it is written.

This module only computes; the read path (:mod:`actstore.engine.read.gather`) and the
writer call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["SCHEMES", "Scheme", "dequantize", "quantize"]


@dataclass(frozen=True, slots=True)
class Scheme:
    """One quantisation scheme: how its codes are stored and what one code can reach."""

    name: str
    numpy: np.dtype[Any]  # dtype of the stored codes (the Zarr array's)
    zarr: str  # Zarr v3 data_type of the codes
    torch: torch.dtype  # what the codes mean
    qmax: float  # the largest code magnitude: scale = amax / qmax


#: Supported schemes.  float8 codes have no Zarr v3 core type: they are stored as
#: uint8 (the raw ``float8_e4m3fn`` bit pattern), as bfloat16 fields are stored as uint16.
SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", np.dtype("i1"), "int8", torch.int8, 127.0),
    "float8_e4m3": Scheme("float8_e4m3", np.dtype("u1"), "uint8", torch.float8_e4m3fn, 448.0),
}


def quantize(x: torch.Tensor, scheme: Scheme, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes (``x``'s shape, the scheme's stored dtype) and scales (float32, one per ``x[i]``) of ``x``.

    ``x`` is ``(n, *inner)`` floating values: rows of a fixed field or tokens of
    a ragged one.  Raises ``ValueError`` if any value is NaN or infinite.
    """
    n = x.shape[0]
    x32 = x.detach().to(torch.float32).reshape(n, math.prod(x.shape[1:]))  # (-1 is ambiguous for n == 0)
    if x32.numel() and not bool(torch.isfinite(x32).all()):
        bad = int((~torch.isfinite(x32)).sum())
        raise ValueError(f"{where}: {bad} values are NaN or infinite; a quantised field ({scheme.name}) holds finite "
                         "values only (nothing was written); replace them first, or store this field unquantised")
    amax = x32.abs().amax(dim=1) if x32.shape[1] else torch.zeros(n, dtype=torch.float32)
    scale = amax / scheme.qmax  # float32
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row stays zero
    y = (x32 / divisor[:, None]).clamp_(-scheme.qmax, scheme.qmax)
    # int8: round half to even; float8: torch's cast (round to nearest even), kept as its bit pattern
    codes = torch.round(y).to(torch.int8) if scheme.torch == torch.int8 else y.to(scheme.torch).view(torch.uint8)
    return codes.reshape(x.shape).numpy(), scale.numpy()


#: float32 value of each float8_e4m3fn bit pattern (a table lookup is several times faster than torch's cast).
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


def dequantize(codes: np.ndarray, scales: np.ndarray, scheme: Scheme, out: torch.Tensor) -> torch.Tensor:
    """Write ``float32(codes) * scales`` (one scale per ``codes[i]``) into ``out`` (any floating dtype).

    One float32 multiplication per value, rounded once into ``out``'s dtype: the
    same bits whichever library multiplies.
    """
    s = scales.reshape(-1, *([1] * (codes.ndim - 1)))
    if scheme.torch == torch.int8:  # int8 x float32 computes in float32, rounds once into out's dtype
        if out.dtype == torch.float32:
            torch.mul(torch.from_numpy(codes), torch.from_numpy(s), out=out)
        else:  # the same bits; torch's mixed-dtype mul into a half output is 2x slower than mul, then cast
            out.copy_(torch.mul(torch.from_numpy(codes), torch.from_numpy(s)))
    elif out.dtype == torch.float32:
        o = out.numpy()
        np.take(_E4M3_VALUES, codes, out=o)
        np.multiply(o, s, out=o)
    else:
        torch.mul(torch.from_numpy(np.take(_E4M3_VALUES, codes)), torch.from_numpy(s), out=out)
    return out
