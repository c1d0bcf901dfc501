"""Splitting a frozen module's batch output into per-row tensors: :func:`output_rows`.

Used by :class:`~actstore.RecycledEncoder` and by :class:`~actstore.CachedDataset`'s fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actstore.engine.read.ragged import PaddedBatch, RaggedBatch

__all__ = ["output_rows"]


def _is_padded_pair(value: Any) -> bool:
    if not (isinstance(value, tuple) and len(value) == 2 and not isinstance(value, PaddedBatch)):
        return False
    values, mask = value
    return (isinstance(values, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.ndim == 2
            and values.ndim >= 2 and tuple(mask.shape) == tuple(values.shape[:2]) and not mask.is_floating_point())


def _carries_mask(value: Any) -> bool:
    mask = getattr(value, "attention_mask", None)
    return (isinstance(value, torch.Tensor) and isinstance(mask, torch.Tensor) and value.ndim >= 3
            and tuple(mask.shape) == tuple(value.shape[:2]))


def _rows_of(value: Any, n: int, name: str, ragged: dict[str, bool] | None) -> list[torch.Tensor]:
    flag: bool
    if isinstance(value, PaddedBatch):
        lens = value.lengths.tolist()
        rows, flag = [value.values[i, :ln] for i, ln in enumerate(lens)], True
    elif _is_padded_pair(value):
        padded, mask = value  # the real tokens wherever they are: right or left padding
        rows, flag = [padded[i][mask[i].bool()] for i in range(len(padded))], True
    elif _carries_mask(value):
        mask = value.attention_mask  # split's frozen part: SplitStates with the batch's mask
        plain = value.as_subclass(torch.Tensor)
        rows, flag = [plain[i][mask[i].bool()] for i in range(len(plain))], True
    elif isinstance(value, RaggedBatch):
        rows, flag = [value[i] for i in range(len(value))], True
    elif isinstance(value, torch.Tensor):
        rows, flag = list(value.unbind(0)) if value.ndim else [], False
    elif isinstance(value, (list, tuple)):
        rows = [torch.as_tensor(r) for r in value]
        flag = len({tuple(r.shape[:1]) for r in rows}) > 1
    else:
        raise TypeError(
            f"the frozen module's output for {name!r} is a {type(value).__name__}; expected a tensor batch, a list "
            "of per-row tensors, an actstore.RaggedBatch, a PaddedBatch or a (padded, mask) pair"
        )
    if len(rows) != n:
        raise ValueError(f"the frozen module returned {len(rows)} rows of {name!r} for {n} inputs")
    if ragged is not None:
        ragged[name] = flag
    return [r.detach().cpu() for r in rows]


def output_rows(output: Any, names: Sequence[str], n: int, ragged: dict[str, bool] | None = None) -> dict[str, list[torch.Tensor]]:
    """Split a frozen module's batch output into per-row CPU tensors, per field.  May copy (device → host).

    ``output`` is one batch (for a single field) or a mapping field → batch; a
    batch is a tensor ``(n, ...)``, a list of per-row tensors, a
    :class:`~actstore.RaggedBatch`, a :class:`PaddedBatch`, a ``(padded, mask)``
    pair or split's :class:`~actstore.models.blocks.SplitStates` (the real tokens
    of each row are kept, on whichever side the padding is).  ``ragged``, if
    given, is filled with whether each field came in a variable-length form.
    """
    if isinstance(output, Mapping):
        missing = [nm for nm in names if nm not in output]
        if missing:
            raise KeyError(f"the frozen module's output has no {missing}; it has {sorted(output)}")
        return {nm: _rows_of(output[nm], n, nm, ragged) for nm in names}
    if len(names) != 1:
        raise TypeError(f"the frozen module returned one batch, but {list(names)} are wanted: return a dict field -> batch")
    return {names[0]: _rows_of(output, n, names[0], ragged)}
