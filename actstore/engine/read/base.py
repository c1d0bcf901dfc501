"""The read path's small shared types: one row (:class:`Row`), what a gather reads of a segment and of a
snapshot (:class:`Segment`, :class:`Rows`), and tensors over arrays (:func:`as_tensor`, :func:`alloc`).

The gathers (:mod:`actstore.engine.read.gather`) and the plans see segments and
snapshots only through these protocols, so
:mod:`actstore.engine.read.snapshot` can use the gathers without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from actstore.errors import CastOverflowError
from actstore.format.fields import Field

__all__ = ["Row", "Rows", "Segment", "alloc", "as_tensor", "refuse_overflow", "row_class"]


class Segment(Protocol):
    """What a gather reads of one segment (:class:`~actstore.engine.read.snapshot.SegmentReader`)."""

    def fixed(self, name: str) -> Any: ...

    def ragged(self, name: str) -> tuple[Any, np.ndarray]: ...

    def scales(self, name: str) -> np.ndarray: ...


class Rows(Protocol):
    """What a gather reads of a snapshot (:class:`~actstore.engine.read.snapshot.Snapshot`)."""

    @property
    def segments(self) -> Sequence[Any]: ...

    @property
    def starts(self) -> np.ndarray:
        """First global row of each segment, then the total (int64, one more entry than segments)."""

    @property
    def starts_list(self) -> list[int]:
        """``starts`` as Python ints (bisect is faster on a list)."""


class Row(dict):  # type: ignore[type-arg]
    """One row of a store whose fields have other names: a dict that finds a field by them too.

    ``aliases`` maps other names of a field to it (a layer's registered module
    name when its field is named after an alias or by ``name=``): ``row[alias]``
    finds the field, while iteration shows the stored names only; the
    ``KeyError`` for a missing name lists the fields.  A store without aliases
    gives plain dicts (:func:`row_class`).
    """

    __slots__ = ("aliases",)

    def __init__(self, data: Any = (), aliases: Mapping[str, str] | None = None) -> None:
        super().__init__(data)
        self.aliases = aliases or {}

    def __missing__(self, key: Any) -> Any:
        name = self.aliases.get(key)
        if name is not None and dict.__contains__(self, name):
            return self[name]
        raise KeyError(f"no field {key!r} in this row; its fields are {sorted(self)}")


def _reduce_row(row: Row) -> tuple[type[Row], tuple[dict[str, Any], Mapping[str, str]]]:
    return Row, (dict(row), row.aliases)  # pickled and copied as a plain Row: a row class lives in one process


def row_class(aliases: Mapping[str, str]) -> type[dict]:  # type: ignore[type-arg]
    """The class of a snapshot's rows: ``cls()``, then ``row[name] = tensor``.

    ``dict`` itself when there are no ``aliases``: a row is then a plain dict,
    the cheapest one Python builds (``store[i]`` builds one a call; with a
    :class:`Row` subclass it read 0.79–0.80× a bare ``torch.from_numpy(map[i])``
    loop, with ``dict`` 0.84–0.85×: docs/benchmarks.md).  Otherwise a :class:`Row` subclass whose rows all carry
    ``aliases`` as a class attribute (nothing stored per row) and whose
    constructor is ``dict``'s own (no Python ``__init__``); its rows behave as a
    ``Row`` in every way (``isinstance``, the aliases, the ``KeyError``), and
    pickled or copied become a plain ``Row``.
    """
    if not aliases:
        return dict
    ns = {"__slots__": (), "aliases": aliases, "__init__": dict.__init__, "__reduce__": _reduce_row,
          "__module__": __name__, "__qualname__": "Row", "__doc__": Row.__doc__}
    return type("Row", (Row,), ns)


def as_tensor(array: np.ndarray, field: Field | None) -> torch.Tensor:
    """Wrap a numpy array as a tensor of the field's dtype.  Never copies."""
    t = torch.from_numpy(array)
    if field is not None and field.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def alloc(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (as default_collate does)."""
    numel = math.prod(shape)
    if not shared or numel == 0:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(numel, device="cpu")
    return elem.new(storage).resize_(shape)


def refuse_overflow(out: torch.Tensor, field: Field, dtype: torch.dtype | None,
                     stored: Callable[[int], torch.Tensor], valid: Callable[[int], int | None]) -> None:
    """A cast to a floating ``dtype`` of smaller range than the field's must not turn a stored finite value into
    ±inf (float32 ``1e5`` is float16 ``inf``).  One ``isinf`` pass over ``out``; only a batch holding ±inf looks
    further: ``stored(i)`` is item ``i`` in the field's own dtype, ``valid(i)`` how many of its leading positions
    are data (None: all; the rest of a padded row is padding)."""
    if dtype is None or not out.is_floating_point() or torch.finfo(dtype).max >= torch.finfo(field.spec.torch).max:
        return
    inf = torch.isinf(out)
    if not bool(inf.any()):
        return
    for i in inf.flatten(1).any(1).nonzero().flatten().tolist():
        ln = valid(i)
        here, src = (inf[i], stored(i)) if ln is None else (inf[i, :ln], stored(i)[:ln])
        made = here & torch.isfinite(src)
        if bool(made.any()):
            raise CastOverflowError(
                f"gather: item {i} holds finite values up to {float(src[made].abs().max()):.6g} in magnitude, which "
                f"a cast to {str(dtype).removeprefix('torch.')} (largest finite {torch.finfo(dtype).max:.6g}) turns "
                "into ±inf; gather it without dtype= or in a dtype of larger range (float32, bfloat16)")
