"""A view's columns: values per dataset position (side values, item keys; docs/FORMAT.md §8), read like a segment.

A version 3 view object lays its columns out as a segment lays out its fields
(:func:`~actstore.format.layout.view_arrays`), so :class:`ViewColumns` reads
them with a :class:`~actstore.engine.read.snapshot.SegmentReader` and is itself
a one-segment :class:`~actstore.engine.read.base.Rows` whose rows are the
view's *positions*: the gathers (``gather_fixed``, ``gather_padded``,
``row_view``) read a column at positions exactly as they read a field at rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actstore.engine.read.base import as_tensor
from actstore.engine.read.maps import ReadCheck
from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.read.snapshot import SegmentReader
from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.fields import Field
from actstore.format.layout import VIEW_ITEM_KEY, VIEWS_DIR
from actstore.format.manifest import SegmentInfo, ViewInfo
from actstore.storage.base import FileProvider

__all__ = ["ViewColumns"]


class ViewColumns:
    """The columns of one committed view: one value per dataset position, and each position's input key.

    Every array is mapped when this is made (with the snapshot: a writer
    deletes a replaced view after its commit, and a map taken earlier survives
    that); a ragged column's offsets are checked then.  Reads never copy.

    Attributes
    ----------
    fields
        Column name -> :class:`~actstore.Field` (empty for a view without columns).
    item_key
        ``(positions, 32)`` uint8: the key of each position's input as precompute
        computed it, or None when the view records none.
    """

    def __init__(self, root: str, name: str, info: ViewInfo, check: ReadCheck | None = None,
                 provide: FileProvider | None = None) -> None:
        self.name = name
        self.info = info
        self.fields: Mapping[str, Field] = dict(info.columns)
        self.reader = SegmentReader(root, SegmentInfo(info.id, info.rows, dict(info.values), info.meta),
                                    dict(info.columns), check, provide, directory=VIEWS_DIR)
        self.segments = [self.reader]
        self.starts = np.array([0, info.rows], np.int64)
        self.starts_list = [0, info.rows]
        self.item_key: np.ndarray | None = None
        if info.item_key:
            self.item_key = self.reader._map(VIEW_ITEM_KEY, info.rows, (32,), INTERNAL_DTYPES["uint8"])
        for column, f in self.fields.items():
            if f.ragged:
                self.reader.ragged(column)
            else:
                self.reader.fixed(column)

    @property
    def rows(self) -> int:
        """Number of positions."""
        return self.info.rows

    def __len__(self) -> int:
        return self.info.rows

    def __contains__(self, column: object) -> bool:
        return column in self.fields

    def __repr__(self) -> str:
        return f"ViewColumns({self.name!r}, positions={self.rows}, columns={list(self.fields)}, " \
               f"item_key={self.item_key is not None})"

    def __getitem__(self, column: str) -> Any:
        """Column ``column`` at every position: a tensor ``(positions, *shape)``, or a
        :class:`~actstore.RaggedBatch` for a ragged (str, bytes or variable-length) column.  Never copies."""
        f = self.fields.get(column)
        if f is None:
            raise KeyError(f"view {self.name!r} has no column {column!r}; its columns are {sorted(self.fields)}")
        if f.ragged:
            values, offsets = self.reader.ragged(column)
            return RaggedBatch(as_tensor(values, f), torch.from_numpy(offsets))
        return as_tensor(self.reader.fixed(column), f)
