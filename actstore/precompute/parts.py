"""Part stores under ``PATH/parts/``: adopting the rows a distributed run left there, and the store at PATH.

A distributed run (``precompute/distributed.py``) computes one part store per
rank under ``PATH/parts/<run>-<rank>`` and merges them into PATH at the end.  A
run killed before its merge leaves committed parts behind; the next run on PATH,
single-process or distributed, adopts them first (:func:`adopt_leftovers`: hard
links, one commit) so that nothing committed is computed twice.  A
single-process run gets here through :func:`adopt_leftover_parts`, called by
:class:`~actstore.precompute.run.Run`.

Deleting a part renames it first, so that a delete cut short never leaves a
half part that looks complete; a part without a manifest holds nothing
committed and is deleted on sight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import uuid
from typing import Any

import numpy as np
import torch

from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.read.views import ViewColumns
from actstore.engine.write.writer import describe_fields
from actstore.errors import StoreExistsError, StoreLockedError
from actstore.format.layout import PARTS_DIR
from actstore.format.record import read_record
from actstore.precompute.augment import AugmentedItems
from actstore.precompute.config import ATTR, PrecomputeConfig
from actstore.precompute.resume import is_placeholder, part_problem, same_config
from actstore.storage.local import StoreLock
from actstore.store import ActivationStore, delete_store, read_manifest
from actstore.store import create as create_store
from actstore.store import open as open_store

__all__ = ["PARTS_DIR", "adopt_leftover_parts", "adopt_leftovers", "delete_part", "has_leftovers", "len_of",
           "merge_view_columns", "open_or_create_main", "parts_dir", "parts_lock", "record_length", "remove_parts_dir"]

log = logging.getLogger("actstore")


def parts_dir(root: str) -> str:
    """``root/parts``: where a distributed run's ranks write their part stores."""
    return os.path.join(root, PARTS_DIR)


def has_leftovers(root: str) -> bool:
    """Whether ``root/parts`` exists (a distributed run was interrupted, or is running)."""
    return os.path.isdir(parts_dir(root))


def len_of(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def parts_lock(parts: str) -> StoreLock:
    """Held while a run uses PATH/parts: a second distributed run on the same PATH is refused."""
    os.makedirs(parts, exist_ok=True)
    try:
        return StoreLock(parts)
    except StoreLockedError as e:
        raise StoreLockedError(f"{parts}: another distributed precompute is writing to this store ({e}); "
                               "wait for it, or write to another path") from e


def adopt_leftover_parts(root: str, fp: str, cfg: PrecomputeConfig, length: int | None) -> int:
    """A single-process run's first step when ``root/parts`` exists: adopt the parts, then remove the directory."""
    lock = parts_lock(parts_dir(root))
    try:
        added = adopt_leftovers(root, fp, cfg.capture.layers, cfg.storage.overwrite, length)
    finally:
        lock.release()
    remove_parts_dir(root)
    return added


def adopt_leftovers(root: str, fp: str, layers: list[str], overwrite: bool, length: int | None = None) -> int:
    """Adopt the committed rows of parts left by an interrupted distributed run into ``root``; returns the rows added.

    A leftover part of another model or other layers is an error (``overwrite``
    deletes it instead, and a store at ``root`` that this run cannot resume).
    The caller holds :func:`parts_lock`.
    """
    parts = parts_dir(root)
    names = _part_names(parts)
    main_exists = os.path.exists(os.path.join(root, "zarr.json"))
    if overwrite and main_exists and part_problem(read_manifest(root), fp, layers, root):
        _delete_main(root)
        main_exists = False
    usable = []
    for name in names:
        p = os.path.join(parts, name)
        problem = part_problem(read_manifest(p), fp, layers, p)
        if problem:
            if not overwrite:
                raise StoreExistsError(f"{p}: a leftover part of an interrupted run holds {problem}; pass "
                                       "overwrite=True (--overwrite) to delete it, or delete it yourself")
            delete_part(p)
            continue
        usable.append(p)
    if not usable:
        return 0
    stores = [open_store(p) for p in usable]
    try:
        real = [s for s in stores if not is_placeholder(s)]
        if not real:
            added = 0
        else:
            main = open_or_create_main(root, real, fp, overwrite, length)
            try:
                added = main.adopt(real)
            finally:
                main.close()
    finally:
        for s in stores:
            s.close()
    for p in usable:
        delete_part(p)
    log.info("%s: adopted %d rows left by an interrupted distributed precompute", root, added)
    return added


def open_or_create_main(root: str, parts: list[ActivationStore], fp: str, overwrite: bool,
                        length: int | None) -> ActivationStore:
    """The store at ``root`` for appending, created from the parts' fields and configuration if absent."""
    real = [p for p in parts if not is_placeholder(p)] or parts
    first = real[0]
    if os.path.exists(os.path.join(root, "zarr.json")):
        main = open_store(root, mode="a")
        if same_config(main, first):
            return main
        placeholder = is_placeholder(main)
        main.close()
        if not (overwrite or placeholder):
            raise StoreExistsError(f"{root}: holds a store of this model, but with other fields or configuration "
                                   f"({describe_fields(main.fields)}) than this run's ({describe_fields(first.fields)}); "
                                   "pass overwrite=True (--overwrite) to replace it, or write to another path")
        _delete_main(root)
    attrs = dict(first.attrs)
    record = read_record(first.attrs, first.path)
    if record is not None:  # the whole dataset's length; no rank's dataset class (a slice of it)
        record = dataclasses.replace(record, dataset_class=None,
                                     dataset_length=record.dataset_length if length is None else length)
        attrs[ATTR] = record.to_json()
    return create_store(root, dict(first.fields), fingerprint=fp, attrs=attrs, chunk_bytes=first.manifest.chunk_bytes)


def record_length(main: ActivationStore, length: int | None) -> None:
    """Make the store's recorded dataset length this run's (CachedDataset checks it against the dataset)."""
    record = read_record(main.attrs, main.path)
    if record is None or record.dataset_length == length:
        return
    main.update_attrs({ATTR: dataclasses.replace(record, dataset_length=length).to_json()})
    main.commit()


#: A view column's values: a fixed column's array, or a ragged one's ``(values, offsets)``.
ColumnData = Any


def merge_view_columns(pieces: list[tuple[np.ndarray, ViewColumns]], n: int) -> tuple[dict[str, Any], dict[str, Any],
                                                                                     np.ndarray | None]:
    """The whole dataset's view columns from the parts': ``(columns, fields, item_key)`` for ``set_view``.

    ``pieces``: each part's global dataset positions (one per position of its
    view) and its view's columns; ``n`` positions in all.  Every value lands at
    its global position (:func:`scatter_columns`).  Positions no part covered
    get zeros (their row is -1).  Raises ``ValueError`` when two parts stored a
    column with different fields.
    """
    fields: dict[str, Any] = {}
    for _, cols in pieces:
        for name, f in cols.fields.items():
            if fields.setdefault(name, f) != f:
                raise ValueError(f"side column {name!r}: one part stored it as {fields[name]}, another as {f}; the "
                                 "dataset's items must have one type per side value")
    data = [(pos, {name: c.reader.ragged(name) if f.ragged else c.reader.fixed(name) for name, f in c.fields.items()},
             c.item_key) for pos, c in pieces]
    out, item_key = scatter_columns(data, fields, n)
    return out, fields, item_key


def scatter_columns(pieces: list[tuple[np.ndarray, dict[str, ColumnData], np.ndarray | None]], fields: dict[str, Any],
                    n: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """View columns of ``n`` positions from pieces of ``(positions, {column: data}, item keys or None)``: every
    value lands at its position (vectorised; a ragged column's elements by one scatter).  Returns ``(columns,
    item_key)`` for ``set_view`` (new arrays; ragged columns as :class:`RaggedBatch`).  Positions no piece covers
    get zeros."""
    item_key = np.zeros((n, 32), np.uint8) if any(k is not None for _, _, k in pieces) else None
    out: dict[str, Any] = {}
    for name, f in fields.items():
        st = f.stored.numpy
        have = [(pos, cols[name]) for pos, cols, _ in pieces if name in cols]
        if not f.ragged:
            col = np.zeros((n, *f.inner_shape), st)
            for pos, src in have:
                col[pos] = src
            out[name] = col
            continue
        lengths = np.zeros(n, np.int64)
        for pos, (_, off) in have:
            lengths[pos] = np.diff(off)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.zeros((int(offsets[-1]), *f.inner_shape), st)
        for pos, (src, off) in have:
            dest = np.arange(int(off[-1]), dtype=np.int64) + np.repeat(offsets[pos] - off[:-1], np.diff(off))
            values[dest] = src
        out[name] = RaggedBatch(torch.from_numpy(values), torch.from_numpy(offsets))
    for pos, _, keys in pieces:
        if item_key is not None and keys is not None:
            item_key[pos] = keys
    return out, item_key


def item_major(items: AugmentedItems, view: np.ndarray, columns: dict[str, Any], fields: dict[str, Any],
               item_key: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """A run's view over :class:`AugmentedItems` (run order, augmentation-major) in the recorded item-major order
    (position ``p * K + v``): ``(view, columns, item_key)``, new arrays."""
    n = len(view)
    pos = items.view_positions(np.arange(n, dtype=np.int64))
    out = np.empty(n, np.int64)
    out[pos] = view
    data = {name: (c.values.numpy(), c.offsets.numpy()) if isinstance(c, RaggedBatch) else np.asarray(c)
            for name, c in columns.items()}
    cols, keys = scatter_columns([(pos, data, item_key)], fields, n)
    return out, cols, keys


def delete_part(path: str) -> None:
    """Rename first, so that a delete cut short never leaves a half part that looks complete."""
    trash = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_parts_dir(root: str) -> None:
    """Remove ``root/parts`` (and its lock) when no part is left in it."""
    parts = parts_dir(root)
    lock = parts_lock(parts)
    try:
        if not _part_names(parts):
            shutil.rmtree(os.path.join(parts, "lock"), ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(parts)
    finally:
        lock.release()


def _part_names(parts: str) -> list[str]:
    """Complete leftover part stores (with a manifest), oldest run first; incomplete ones are deleted."""
    out = []
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
        p = os.path.join(parts, name)
        if name == "lock" or not os.path.isdir(p):
            continue
        if name.startswith(".deleting-") or not os.path.exists(os.path.join(p, "zarr.json")):
            shutil.rmtree(p, ignore_errors=True)  # a clone or delete cut short: holds nothing committed
            continue
        out.append(name)
    return out


def _delete_main(root: str) -> None:
    parts = parts_dir(root)
    moved = None
    if os.path.isdir(parts):  # delete_store refuses directories it does not know
        moved = f"{root}.parts-{uuid.uuid4().hex[:8]}"
        os.rename(parts, moved)
    try:
        delete_store(root)
    finally:
        if moved is not None:
            os.makedirs(root, exist_ok=True)
            os.rename(moved, parts)
