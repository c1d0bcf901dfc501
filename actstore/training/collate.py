"""Collation for store batches: one copy from the memory maps into the batch.

:class:`ActivationCollate` / :data:`collate` gather a :class:`RowBatch` (what a
dataset's ``__getitems__`` returns: the rows, nothing copied yet) field by field
into freshly allocated batch tensors — ragged fields padded (with a mask and
lengths), floating fields cast to the head's dtype, and, inside a DataLoader
worker, straight into shared memory, so the batch reaches the training process
without a second copy.  ``RowBatch`` is also a sequence of per-row items, so
collate functions that iterate over samples keep working (they copy per row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import collate as torch_collate
from torch.utils.data._utils.collate import default_collate, default_collate_fn_map

from actstore.engine.read.base import Row, Rows, alloc
from actstore.engine.read.gather import check_float_dtype, gather_fixed, gather_padded
from actstore.engine.read.ragged import PaddedBatch
from actstore.format.fields import Field

__all__ = ["ActivationCollate", "PaddedBatch", "RowBatch", "collate"]

# -- batches and collation ----------------------------------------------------------


class RowBatch(Sequence):  # type: ignore[type-arg]
    """What ``__getitems__`` returns: a batch's rows, not copied yet.  Never copies.

    :class:`ActivationCollate` gathers it into batch tensors (one copy).  As a
    sequence it yields the dataset's per-row items, so any collate function that
    iterates over samples (``default_collate``) also works.
    """

    __slots__ = ("computed", "dataset", "positions", "rows")

    def __init__(self, dataset: Any, positions: np.ndarray, rows: np.ndarray,
                 computed: dict[str, dict[int, torch.Tensor]] | None = None) -> None:
        self.dataset = dataset
        self.positions = positions
        self.rows = rows
        self.computed = computed or {}

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item_of = getattr(self.dataset, "batch_item", None)  # a dataset whose item depends on more than its position
        return _mark(item_of(self, i) if item_of is not None else self.dataset[int(self.positions[i])], self)

    def __repr__(self) -> str:
        return f"RowBatch({len(self)} rows of {type(self.dataset).__name__})"


# -- torch's default collate, extended ---------------------------------------------------------
#
# ``DataLoader(ds, batch_size=...)`` with no ``collate_fn`` hands the RowBatch to
# ``torch.utils.data.default_collate``, which dispatches on the type of
# ``batch[0]`` through ``default_collate_fn_map`` (its documented extension
# point).  RowBatch items are therefore given marker types (a dict, tuple,
# namedtuple or tensor subclass that remembers its RowBatch); the registered
# function sees the marker, checks that the list it got *is* that RowBatch,
# and gathers it with :data:`collate` — one copy, as with
# ``collate_fn=actstore.collate``.  Anything else with a marker (a list of items
# taken out of a batch) is collated as the plain types would be.


class RowDict(Row):
    """A :class:`RowBatch` item that is a dict (a plain dict otherwise)."""

    __slots__ = ("_actstore_rows",)


class RowTuple(tuple):  # type: ignore[type-arg]
    """A :class:`RowBatch` item that is a tuple (a plain tuple otherwise)."""


class RowTensor(torch.Tensor):
    """A :class:`RowBatch` item that is a tensor; operations on it give plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]


_ROW_NAMEDTUPLES: dict[type, type] = {}


def _row_namedtuple(t: type) -> type:
    sub = _ROW_NAMEDTUPLES.get(t)
    if sub is None:
        sub = _ROW_NAMEDTUPLES[t] = type(t.__name__, (t,), {"__module__": t.__module__})
        default_collate_fn_map[sub] = _collate_rows
    return sub


def _mark(item: Any, rows: RowBatch) -> Any:
    t = type(item)
    m: Any
    if t is dict or (isinstance(item, Row) and t is not RowDict):  # (store[i] rows are of a Row subclass)
        m = RowDict(item, getattr(item, "aliases", None))
    elif t is tuple:
        m = RowTuple(item)
    elif isinstance(item, tuple) and hasattr(item, "_fields"):
        m = _row_namedtuple(t)(*item)
    elif t is torch.Tensor:
        m = item.as_subclass(RowTensor)
    else:
        return item  # other item types: default_collate collates them row by row, as without a marker
    m._actstore_rows = rows
    return m


def _unmark(item: Any) -> Any:
    if isinstance(item, RowDict):
        return dict(item)
    if isinstance(item, RowTensor):
        return item.as_subclass(torch.Tensor)
    if isinstance(item, RowTuple):
        return tuple(item)
    if type(item) in _ROW_NAMEDTUPLES.values():
        return type(item).__mro__[1](*item)
    return item


def _collate_rows(batch: Any, *, collate_fn_map: Any = None) -> Any:
    """``default_collate_fn_map`` entry for RowBatch items: a whole RowBatch is gathered by :data:`collate`."""
    rows = getattr(batch[0], "_actstore_rows", None)
    if rows is not None and batch is rows:
        return collate(rows)
    return torch_collate([_unmark(x) for x in batch], collate_fn_map=collate_fn_map)


for _t in (RowDict, RowTuple, RowTensor):
    default_collate_fn_map[_t] = _collate_rows


class ActivationCollate:
    """Collate function for store batches: pad ragged fields, cast, one copy.

    Parameters
    ----------
    dtype
        Cast floating-point fields to this dtype (the head's), e.g. ``torch.float32``
        for a float16 store.  Integer and bool fields (labels, ids) keep theirs.
    pad_to_multiple_of
        Round the padded length of ragged fields up to a multiple of this.
    pad_value
        Value written into the padding.
    mask_dtype
        dtype of the masks (``torch.bool``; ``torch.int64`` for 0/1 masks).
    names
        Plain-dict batches (what ``transformers.Trainer``, ``accelerate`` and
        ``pin_memory`` move without help): field (or item key) → the key it gets
        in the batch, e.g. ``{"encoder.layer.2": "hidden_states"}``; ``{}``
        keeps every name.  A ragged field then becomes two tensors, its padded
        values under its name and its mask under ``mask_names[field]`` (default
        ``"attention_mask"`` when the batch has one ragged field, else
        ``"<name>_mask"``); side columns keep their names.  Several fields served
        under one item key are merged into the batch.  Applies to dict batches;
        None (the default) keeps :class:`PaddedBatch` values.
    mask_names
        Field → the key of its mask, with ``names``.

    A :class:`RowBatch` is gathered field by field from the maps into the batch
    (always copies, once; into shared memory inside a DataLoader worker).  A list
    of samples (any dataset) is stacked, or padded where first dimensions differ.
    An already-batched result (a mapping, a tensor or a :class:`PaddedBatch`
    rather than a list of samples) is passed through unchanged.  Ragged fields
    become a :class:`PaddedBatch`; fixed ones a plain tensor, with no padding.

    Examples
    --------
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=ActivationCollate(torch.float32))  # doctest: +SKIP
    """

    def __init__(self, dtype: torch.dtype | None = None, pad_to_multiple_of: int | None = None, *,
                 pad_value: float = 0, mask_dtype: torch.dtype = torch.bool, names: Mapping[str, str] | None = None,
                 mask_names: Mapping[str, str] | None = None) -> None:
        check_float_dtype(dtype)
        for what, m in (("names", names), ("mask_names", mask_names)):
            if m is not None and (not isinstance(m, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in m.items())):
                raise TypeError(f"{what}: expected a dict of str -> str or None, got {m!r}")
        if mask_names is not None and names is None:
            names = {}
        self.names = None if names is None else dict(names)
        self.mask_names = dict(mask_names or {})
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        self.dtype = dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_value = pad_value
        self.mask_dtype = mask_dtype

    def __repr__(self) -> str:
        extra = "" if self.names is None else f", names={self.names}"
        return f"ActivationCollate(dtype={self.dtype}, pad_to_multiple_of={self.pad_to_multiple_of}{extra})"

    def gather(self, snap: Rows | None, name: str, field: Field, rows: np.ndarray, *, shared: bool = False,
               extra: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor | PaddedBatch:
        """One field of a batch with these options (see :func:`gather_fixed`, :func:`gather_padded`)."""
        if field.ragged:
            return gather_padded(snap, name, field, rows, dtype=self.dtype, pad_to_multiple_of=self.pad_to_multiple_of,
                                 pad_value=self.pad_value, mask_dtype=self.mask_dtype, shared=shared, extra=extra)
        return gather_fixed(snap, name, field, rows, dtype=self.dtype, shared=shared, extra=extra)

    def __call__(self, batch: Any) -> Any:
        out = self._collate(batch)
        if self.names is None or not isinstance(out, Mapping):
            return out
        self._check_tokens(batch, out)
        return self.flatten(out)

    @staticmethod
    def _check_tokens(batch: Any, out: Mapping[str, Any]) -> None:
        """Plain-dict batches carry an attention mask: a row with no token would make attention divide by zero."""
        for k, v in out.items():
            parts = v.items() if isinstance(v, Mapping) and not isinstance(v, PaddedBatch) else [(k, v)]
            for name, x in parts:
                if isinstance(x, PaddedBatch) and len(x.lengths) and int(x.lengths.min()) == 0:
                    i = int(torch.nonzero(x.lengths == 0)[0])
                    pos = int(batch.positions[i]) if isinstance(batch, RowBatch) else i
                    where = f"dataset[{pos}]" if isinstance(batch, RowBatch) else f"batch item {i}"
                    raise ValueError(f"{where}: field {name!r} has a row of zero tokens, which an attention mask "
                                     "cannot hold (attention over no token is undefined); drop that item from the "
                                     "dataset, or collate without names= to get PaddedBatch values")

    def _collate(self, batch: Any) -> Any:
        shared = get_worker_info() is not None
        if isinstance(batch, RowBatch):
            return batch.dataset._collate(batch, self, shared)
        if isinstance(batch, (Mapping, torch.Tensor, PaddedBatch)):
            return batch  # already batched
        if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
            raise TypeError(f"collate: expected a list of samples or a RowBatch, got {type(batch).__name__}")
        return self._samples(list(batch), shared) if len(batch) else batch

    def flatten(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A dict batch as a plain dict of tensors (see ``names``).  Never copies."""
        names = self.names or {}
        flat: list[tuple[str, Any]] = []
        for k, v in batch.items():
            if isinstance(v, Mapping) and not isinstance(v, PaddedBatch):  # several fields under one item key
                flat.extend((str(f), x) for f, x in v.items())
            else:
                flat.append((str(k), v))
        ragged = sum(isinstance(v, PaddedBatch) for _, v in flat)
        out: dict[str, Any] = {}
        for k, v in flat:
            name = names.get(k, k)
            if isinstance(v, PaddedBatch):
                mask = self.mask_names.get(k) or ("attention_mask" if ragged == 1 else f"{name}_mask")
                for key, value in ((name, v.values), (mask, v.mask)):
                    if key in out:
                        raise ValueError(f"collate: two batch entries are named {key!r}; rename them with names= "
                                         "or mask_names=")
                    out[key] = value
            else:
                if name in out:
                    raise ValueError(f"collate: two batch entries are named {name!r}; rename them with names=")
                out[name] = v
        return out

    def _samples(self, samples: list[Any], shared: bool) -> Any:
        elem = samples[0]
        if isinstance(elem, np.ndarray) and elem.dtype.kind in "biuf":
            samples, elem = [torch.from_numpy(np.asarray(s)) for s in samples], torch.from_numpy(elem)
        if isinstance(elem, torch.Tensor):
            return self._tensors(samples, shared)
        if isinstance(elem, Mapping):
            return {k: self._samples([s[k] for s in samples], shared) for k in elem}
        if isinstance(elem, tuple) and hasattr(elem, "_fields"):
            return type(elem)(*(self._samples(list(parts), shared) for parts in zip(*samples, strict=True)))
        if isinstance(elem, (tuple, list)):
            return type(elem)(self._samples(list(parts), shared) for parts in zip(*samples, strict=True))
        return default_collate(samples)

    def _tensors(self, ts: list[torch.Tensor], shared: bool) -> torch.Tensor | PaddedBatch:
        first = ts[0]
        dt = self.dtype if self.dtype is not None and first.is_floating_point() else first.dtype
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) == 1:
            out = alloc((len(ts), *first.shape), dt, shared)
            if all(t.dtype == dt for t in ts):
                return torch.stack(ts, 0, out=out)
            for i, t in enumerate(ts):
                out[i].copy_(t)
            return out
        inner = {s[1:] for s in shapes}
        if first.ndim == 0 or len(inner) != 1:
            raise ValueError(f"collate: cannot batch tensors of shapes {sorted(shapes)[:4]}: only the first "
                             "dimension may differ (it is padded)")
        lengths = torch.tensor([len(t) for t in ts], dtype=torch.int64)
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = alloc((len(ts), width, *first.shape[1:]), dt, shared)
        for i, t in enumerate(ts):
            out[i, : len(t)].copy_(t)
            out[i, len(t) :] = self.pad_value
        lens = alloc((len(ts),), torch.int64, shared).copy_(lengths)
        mask = alloc((len(ts), width), self.mask_dtype, shared)
        mask.copy_(torch.arange(width)[None, :] < lengths[:, None])
        return PaddedBatch(out, mask, lens)


#: The default collate function: no cast, no extra padding.
collate = ActivationCollate()


