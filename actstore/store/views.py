"""The views part of :class:`~actstore.ActivationStore`: named position -> row lists, and their columns.

A view maps positions (of a dataset, say) to rows; precompute records the
dataset's order as the view ``"dataset"``, and since format version 3 the side
values of every position (labels, ids) and the key of its input as columns of
that view (docs/FORMAT.md §8): side values belong to dataset positions, rows
to inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.engine.read.maps import ReadCheck, map_view
from actstore.engine.read.views import ViewColumns
from actstore.engine.write.writer import StoreWriter
from actstore.format.fields import Field
from actstore.format.manifest import Manifest
from actstore.storage.base import FileProvider

__all__ = ["StoreViews"]


class StoreViews:
    """Mixed into :class:`~actstore.ActivationStore` (whose state it reads)."""

    path: str
    _views: dict[str, np.ndarray]
    _columns: dict[str, ViewColumns]
    _check: ReadCheck | None
    _provide: FileProvider | None

    if TYPE_CHECKING:  # the store's own
        @property
        def manifest(self) -> Manifest: ...

        def _check_open(self) -> None: ...

        def _writable(self) -> StoreWriter: ...

    @property
    def views(self) -> list[str]:
        """Names of the committed views."""
        return sorted(self.manifest.views)

    def view(self, name: str) -> np.ndarray:
        """A committed view: an int64 array of rows (-1 where a row is missing).  Never copies.

        Precompute records the dataset's order as a view, so that training can map
        dataset position ``i`` to its row without reading the dataset.
        """
        self._check_open()
        v = self._views.get(name)
        if v is None:
            info = self.manifest.views.get(name)
            if info is None:
                raise KeyError(f"view {name!r} is not in the store; it has {self.views}")
            v = self._views[name] = map_view(self.path, info, self._check, self._provide)
        return v

    def view_columns(self, name: str) -> ViewColumns | None:
        """The columns of view ``name``: values per position, or None for a view without columns.  Never copies.

        Precompute stores the side values of every dataset position (labels,
        ids: each item's parts other than its input) as columns of the
        ``"dataset"`` view, and the key of each position's input as
        ``.item_key``: ``store.view_columns("dataset")["label"]`` is the
        labels in dataset order, one per position — also where several
        positions share one row.  Stores written before format version 3 keep
        side values as row fields instead (one per row: the first position's).
        """
        self._check_open()
        if name not in self.manifest.views:
            raise KeyError(f"view {name!r} is not in the store; it has {self.views}")
        return self._columns.get(name)

    def set_view(self, name: str, rows: object, columns: Mapping[str, Any] | None = None, *,
                 fields: Mapping[str, Field] | None = None, item_key: object = None) -> None:
        """Record (or replace) a named view of rows with the next commit.

        ``rows`` are committed row numbers, or -1 for "no row"; values outside
        ``[-1, len(store))`` are refused.  ``columns``: column name -> one value
        per position (a fixed column as an ``(n, *shape)`` array, a ragged one as a
        list of arrays or a :class:`~actstore.RaggedBatch`), stored as ``fields[name]``
        (default: inferred from a fixed column's first value).  ``item_key``:
        ``n`` 32-byte keys of the positions' inputs.  A view with columns or
        keys makes the store format version 3 (FORMAT.md §8).
        """
        self._writable().set_view(name, rows, columns, fields, item_key)

    def carry_views(self, src: Any) -> None:
        """Set each view of store ``src`` here too (with its columns), mapped to this store's rows by key
        (with the next commit)."""
        self._writable().carry_views(src)
