"""Batches of variable-length rows: flat values plus offsets (:class:`RaggedBatch`), or padded (:class:`PaddedBatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

__all__ = ["PaddedBatch", "RaggedBatch"]


@dataclass(frozen=True, slots=True)
class RaggedBatch:
    """Rows of different lengths stored back to back.

    Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.  This is how ragged
    fields (for example tokens × hidden) are appended to and gathered from a
    store: no padding is ever stored.

    Examples
    --------
    >>> rb = RaggedBatch.from_list([torch.ones(2, 3), torch.zeros(1, 3)])
    >>> rb.lengths.tolist()
    [2, 1]
    >>> padded, mask = rb.to_padded()
    >>> padded.shape, mask.sum().item()
    (torch.Size([2, 2, 3]), 3)
    """

    values: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets.dtype != torch.int64:
            raise ValueError(f"offsets: expected a 1-D int64 tensor of n + 1 entries, got {tuple(self.offsets.shape)} {self.offsets.dtype}")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.values):
            raise ValueError(f"offsets: must run from 0 to len(values) = {len(self.values)}, got {int(self.offsets[0])}..{int(self.offsets[-1])}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        """Row ``i`` as a view of ``values``.  Never copies."""
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def lengths(self) -> torch.Tensor:
        """Each row's number of elements (tokens), from the offsets; a new tensor."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_list(cls, rows: Sequence[torch.Tensor]) -> RaggedBatch:
        """Concatenate rows (each ``(len_i, *inner)``).  Always copies, once."""
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        return cls(torch.cat(list(rows)) if len(rows) else torch.empty(0), offsets)

    def to_padded(self, pad_to: int | None = None, pad_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded, mask): ``(n, L, *inner)`` values and an ``(n, L)`` bool mask.  Always copies."""
        lengths = self.lengths
        width = int(lengths.max()) if len(self) else 0
        width = max(width, pad_to or 0)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        padded = self.values.new_full((len(self), width, *self.values.shape[1:]), pad_value)
        padded[mask] = self.values
        return padded, mask


class _Padded(NamedTuple):
    values: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


class PaddedBatch(_Padded):
    """A ragged field as a padded batch: ``values`` ``(n, L, *inner)``, ``mask`` ``(n, L)``, ``lengths`` ``(n,)``.

    Rows are right-padded; ``mask[i, t]`` is true for ``t < lengths[i]``.
    Unpack it like a tuple: ``hidden, mask, lengths = batch["hidden"]``.  It
    can also be rebuilt from one iterable of its three parts, as
    ``transformers.Trainer`` rebuilds tuples (``type(x)(generator)``); the
    ``type(x)(*parts)`` of ``accelerate`` and ``pin_memory`` works as for any
    named tuple.
    """

    __slots__ = ()

    def __new__(cls, values: Any, mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> PaddedBatch:
        if mask is None and lengths is None and not isinstance(values, torch.Tensor):
            parts = tuple(values)  # rebuilt from an iterable of (values, mask, lengths)
            if len(parts) != 3:
                raise TypeError(f"PaddedBatch: expected (values, mask, lengths), got {len(parts)} parts")
            values, mask, lengths = parts
        if mask is None or lengths is None:
            raise TypeError("PaddedBatch: expected values, mask and lengths")
        return super().__new__(cls, values, mask, lengths)

    def to(self, *args: Any, **kwargs: Any) -> PaddedBatch:
        """Move (or cast) the values and move the mask and lengths.  Copies only if needed."""
        device_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
        devices = [a for a in args if not isinstance(a, torch.dtype)]
        return PaddedBatch(
            self.values.to(*args, **kwargs), self.mask.to(*devices, **device_kwargs),
            self.lengths.to(*devices, **device_kwargs),
        )
