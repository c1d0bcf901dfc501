"""The side values :class:`~actstore.CachedDataset` serves: always ``dataset[i]``'s own (labels, ids).

Side values belong to dataset positions, not to rows (two positions with one
input share a row, not a label).  Where they come from, by store and mode:

- ``"view"`` — a store written by precompute since format version 3: the
  ``"dataset"`` view's columns hold every position's side values
  (FORMAT.md §8); served from there, the items are not read while training.
- ``"rows"`` — a store written before: side values are row fields, one per row
  (the first position's).  Served from the rows, as before; the construction
  check below catches positions whose own values differ.
- ``"items"`` — ``index="keys"``, or a store without side values and without
  a precompute record (``RecycledEncoder``'s, ``infer(out=)``'s, one made with
  ``store.append``): read from ``dataset[i]`` itself, so **the item is read**
  for each served position.

At construction, the stored values ("view", "rows") are compared with the
dataset's own at the positions the key check reads (every position when items
are cheap to read, a seeded spot check otherwise): a dataset relabelled since
precompute raises :class:`~actstore.DatasetMismatchError` naming the positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actstore.engine.read.gather import gather_fixed, gather_ragged, row_view
from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.read.views import ViewColumns
from actstore.errors import DatasetMismatchError
from actstore.format.fields import Field
from actstore.precompute.items import ItemLayout, SideColumn, SideColumns, decode_side, encode_side, item_part
from actstore.store import ActivationStore

__all__ = ["SHOWN_POSITIONS", "SideSource", "default_sides"]

#: Dataset positions named in a side-value mismatch error.
SHOWN_POSITIONS = 5


def default_sides(item: Any, input: Any) -> dict[Any, str]:  # noqa: A002
    """Every part of ``item`` but its input, as a side part (for stores that record no side columns)."""
    if input is None:
        return {}
    if isinstance(item, tuple):
        i = int(input) % max(len(item), 1)
        return {j: f"item_{j}" for j in range(len(item)) if j != i}
    if isinstance(item, Mapping):
        skip = set(input) if isinstance(input, (tuple, list)) else {input}
        return {k: str(k) for k in item if k not in skip}
    return {}


class SideSource:
    """Where one :class:`~actstore.CachedDataset` takes side values from (``kind``: see the module docstring)."""

    def __init__(self, store: ActivationStore, layout: ItemLayout, *, index: str, view: str, where: str,
                 inferred: bool = False, stride: int = 1) -> None:
        """``inferred``: the side parts were not recorded nor given but inferred from the items (a store without a
        precompute record); when the store holds none of them, they are read from the items.  ``stride``: the view
        lists each position ``stride`` times (stored augmentations: position ``p``'s values at ``p * stride``)."""
        self.layout = layout
        self.stride = stride
        self.cols: ViewColumns | None = None
        side = dict(layout.side)
        fields: Mapping[str, Field] = store.fields
        if not side:
            self.kind = "none"
        elif index == "keys":
            self.kind = "items"
        else:
            cols = store.view_columns(view) if view in store.views else None
            if cols is not None and all(f in cols.fields for f in side.values()):
                self.kind, self.cols, fields = "view", cols, cols.fields
            elif all(f in store.fields for f in side.values()):
                self.kind = "rows"
            elif inferred and not any(f in store.fields for f in side.values()):
                self.kind = "items"
            else:
                have = sorted({*store.fields, *(cols.fields if cols is not None else ())})
                raise KeyError(f"{where}: side fields {sorted(set(side.values()) - set(have))} are neither view "
                               f"columns nor fields of the store; it has {have}")
        self.fields = {k: fields[f] for k, f in side.items()} if self.kind in ("view", "rows") else {}

    @property
    def reads_items(self) -> bool:
        """Whether serving a position reads ``dataset[i]`` (``"items"``)."""
        return self.kind == "items"

    # -- serving -------------------------------------------------------------------------
    def item(self, p: int, row: int, store: ActivationStore, dataset: Any) -> dict[Any, Any]:
        """Side values of position ``p`` (row ``row``, -1 for none) as ``dataset[p]`` holds them.  Never copies
        stored values (a str is decoded)."""
        t = self.layout
        if self.kind == "none":
            return {}
        if self.kind == "items" or (self.kind == "rows" and row < 0):
            item = dataset[p]
            return {k: item_part(item, k) for k in t.side}
        if self.kind == "view":
            assert self.cols is not None
            seg, local = self.cols.reader, p * self.stride
        else:
            seg, local = store.snapshot.locate(row)
        return {k: decode_side(row_view(seg, local, fn, self.fields[k]), t.kinds[k]) for k, fn in t.side.items()}

    def raw(self, positions: np.ndarray, rows: np.ndarray, dataset: Any) -> dict[int, Any] | None:
        """The items a batch must read for its side values: batch offset -> item (None: nothing to read)."""
        if self.kind == "items":
            return {j: dataset[int(p)] for j, p in enumerate(positions.tolist())}
        return None

    def batch(self, store: ActivationStore, positions: np.ndarray, rows: np.ndarray,
              computed: Mapping[str, Mapping[int, Any]], opts: Any, shared: bool) -> dict[Any, Any]:
        """Side values of a batch: a tensor per numeric part (floats cast as ``opts`` casts), a list per str/bytes
        part.  Always copies, once."""
        t = self.layout
        out: dict[Any, Any] = {}
        if self.kind == "none":
            return out
        if self.kind == "items":
            items = computed.get("items", {})
            for k in t.side:
                out[k] = self._from_items([item_part(items[j], k) for j in range(len(positions))], k, positions, opts)
            return out
        src: Any = self.cols if self.kind == "view" else store.snapshot
        idx = positions * self.stride if self.kind == "view" else rows
        for k, fn in t.side.items():
            f = self.fields[k]
            raw = computed.get(f"side:{k}", {}) if self.kind == "rows" else {}
            if t.kinds[k] in ("str", "bytes"):  # a list, as default_collate gives for strings
                out[k] = [raw[j] if r < 0 else decode_side(row_view(*_locate(src, r, self.kind), fn, f), t.kinds[k])
                          for j, r in enumerate(idx.tolist())]
            else:
                extra = {j: torch.as_tensor(v) for j, v in raw.items()}
                out[k] = opts.gather(src, fn, f, idx, shared=shared, extra=extra)
        return out

    def _from_items(self, values: list[Any], k: Any, positions: np.ndarray, opts: Any) -> Any:
        kind = self.layout.kinds[k]
        if kind in ("str", "bytes"):
            return values
        _, spec = encode_side(str(k), values[0])
        col = SideColumns([SideColumn(str(k), "v", kind, spec)]).convert([{str(k): v} for v in values],
                                                                        positions.tolist())["v"]
        if isinstance(col, list):
            return col
        t = torch.from_numpy(np.ascontiguousarray(col))
        return t.to(opts.dtype) if opts.dtype is not None and t.is_floating_point() else t

    # -- the construction check -------------------------------------------------------------
    def check(self, store: ActivationStore, dataset: Any, positions: np.ndarray, rows: np.ndarray, where: str) -> int:
        """Compare the stored side values of ``positions`` with ``dataset``'s own; returns how many were checked.

        Raises :class:`DatasetMismatchError` naming the positions whose values differ.
        """
        if self.kind not in ("view", "rows"):
            return 0
        if self.kind == "rows":
            positions = positions[rows[positions] >= 0]
        if not len(positions):
            return 0
        t = self.layout
        src: Any = self.cols if self.kind == "view" else store.snapshot
        idx = positions * self.stride if self.kind == "view" else rows[positions]
        items = [dataset[int(p)] for p in positions.tolist()]
        bad = np.zeros(len(positions), bool)
        for k, fn in t.side.items():
            f = self.fields[k]
            column = SideColumns([SideColumn(str(k), fn, t.kinds[k], f)])
            try:
                mine = column.convert([{str(k): item_part(it, k)} for it in items], positions.tolist())[fn]
            except (TypeError, ValueError) as e:
                raise DatasetMismatchError(
                    f"{where}: side value {k!r} of the dataset no longer matches the store ({e}): the dataset changed "
                    "since precompute; rerun precompute on it (it recomputes no activation and rewrites the side "
                    "values)") from e
            bad |= _differ(mine, src, fn, f, idx)
        if bad.any():
            shown = ", ".join(f"dataset[{int(p)}]" for p in positions[bad][:SHOWN_POSITIONS])
            more = f" and {int(bad.sum()) - SHOWN_POSITIONS} more" if bad.sum() > SHOWN_POSITIONS else ""
            first = int(positions[bad][0])
            stored = self.item(first, int(rows[first]), store, dataset)
            own = {k: item_part(items[int(np.flatnonzero(bad)[0])], k) for k in t.side}
            raise DatasetMismatchError(
                f"{where}: {int(bad.sum())} of the {len(positions)} checked positions have side values (labels, ids) "
                f"other than the store's: {shown}{more} (dataset[{first}]: {_short(own)}, stored: {_short(stored)}); "
                "the dataset was relabelled since precompute: rerun precompute on it (it recomputes no activation, "
                "only rewrites the side values)")
        return len(positions)


def _locate(src: Any, r: int, kind: str) -> tuple[Any, int]:
    return (src.reader, r) if kind == "view" else src.locate(r)


def _differ(mine: Any, src: Any, name: str, field: Field, idx: np.ndarray) -> np.ndarray:
    """Per position: whether the dataset's value (storage form) differs from the stored one, byte for byte."""
    n = len(idx)
    if not field.ragged:
        stored = gather_fixed(src, name, field, idx).numpy()
        a = np.ascontiguousarray(np.asarray(mine)).reshape(n, -1).view(np.uint8)
        b = np.ascontiguousarray(stored).reshape(n, -1).view(np.uint8)
        if a.shape != b.shape:
            return np.ones(n, bool)
        return (a != b).any(axis=1)
    stored_rb = gather_ragged(src, name, field, idx)
    s_off, s_val = stored_rb.offsets.numpy(), stored_rb.values.numpy()
    if isinstance(mine, RaggedBatch):
        m_off, m_val = mine.offsets.numpy(), mine.values.numpy()
        rows = [m_val[m_off[j]:m_off[j + 1]] for j in range(n)]
    else:  # a ragged array column: as validate_batch would store each row
        rows = [np.asarray(v).astype(field.stored.numpy, copy=False) for v in mine]
    return np.array([rows[j].shape[1:] != s_val.shape[1:] or
                     np.ascontiguousarray(rows[j]).tobytes() != s_val[s_off[j]:s_off[j + 1]].tobytes()
                     for j in range(n)], bool)


def _short(values: Mapping[Any, Any]) -> str:
    return "{" + ", ".join(f"{k!r}: {v!r:.40}" for k, v in values.items()) + "}"
