"""Opening and creating stores on a backend: the steps before a handle exists.

:func:`actstore.store.open` and :func:`actstore.store.create` check their
arguments, pick the backend, and call these; the handle is built from what
they return (the manifest, its version token and the writer lock).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from actstore.engine.commit import Head, ids, publish
from actstore.engine.read.maps import ReadCheck, map_view
from actstore.engine.read.snapshot import Snapshot
from actstore.engine.read.views import ViewColumns
from actstore.engine.read.zarrread import ZarrSegmentReader
from actstore.errors import CorruptStoreError, StaleStoreError, StoreError, StoreNotFoundError
from actstore.format.codecs import MAX_INNER_CHUNK_BYTES
from actstore.format.documents import name_argument
from actstore.format.fields import Field
from actstore.format.manifest import Manifest, parse_root
from actstore.storage.backends import backend_for, fspath
from actstore.storage.base import Backend, FileProvider, WriterLock, remove_unreferenced
from actstore.storage.lease import DEFAULT_LEASE_SECONDS
from actstore.storage.objects import is_url

__all__ = ["backend_to_open", "check_fingerprint", "check_new", "create_new", "load_snapshot", "open_parts",
           "read_head"]

log = logging.getLogger("actstore")


def backend_to_open(path: str | os.PathLike[str], mode: str = "r", *, verify_reads: bool = False,
                    cache_dir: Any = None, cache_bytes: int | None = None,
                    storage_options: Mapping[str, Any] | None = None,
                    lease_seconds: float | None = None) -> Backend:
    """The backend of an existing store at ``path`` (a directory or URL), after :func:`actstore.open`'s checks."""
    if mode not in ("r", "a"):
        raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
    if is_url(path):
        if verify_reads and cache_dir is False and mode == "r":
            raise ValueError("verify_reads=True needs the chunk cache (files are checked whole); drop cache_dir=False")
    elif not os.path.isdir(fspath(path)):
        raise StoreNotFoundError(f"{fspath(path)}: no store here (not a directory)")
    return backend_for(path, cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options,
                       lease_seconds=DEFAULT_LEASE_SECONDS if lease_seconds is None else lease_seconds)


def read_head(backend: Backend) -> tuple[Manifest, str]:
    """The backend's manifest and its version token (:class:`StoreNotFoundError` when there is none)."""
    try:
        data, token = backend.read_manifest()
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"{backend.url}: no store here (no zarr.json); create one with actstore.create()") \
            from e
    return parse_root(data, f"{backend.url}/zarr.json"), token


def load_snapshot(backend: Backend, manifest: Manifest, check: ReadCheck | None, provide: FileProvider | None,
                  *, retry: bool) -> tuple[Snapshot, dict[str, np.ndarray], dict[str, ViewColumns]]:
    """A handle's snapshot of ``manifest``, with its index runs and views (rows, and columns) mapped now.

    A writer deletes the index runs and views that its commit superseded, so a
    reader whose manifest was replaced just before it mapped them finds them
    gone: with ``retry`` (readers) it then reads the manifest again and retries
    with the newer commit — unless rows were renumbered in between (a compaction
    that dropped rows): then this snapshot's row numbers do not hold there, and
    it raises :class:`StoreError`.
    """
    root, zroot = backend.root, backend.segment_store()

    def newest() -> Manifest:  # a reader of an older commit relocating a compacted segment
        return read_head(backend)[0]

    for _ in range(100):
        try:
            snap = Snapshot(root, manifest, check, provide, newest)
            if zroot is not None:  # cache_dir=False: segment rows through zarr-python
                snap.segments = [ZarrSegmentReader(zroot, root, s, snap.fields) for s in manifest.segments]
            # Mapped with the snapshot (like index runs): a writer deletes a replaced view after its commit,
            # and a map taken earlier survives that.
            views = {name: map_view(root, info, check, provide) for name, info in manifest.views.items()}
            columns = {name: ViewColumns(root, name, info, check, provide) for name, info in manifest.views.items()
                       if info.has_columns}
        except CorruptStoreError as e:
            newer = read_head(backend)[0] if retry else None
            if newer is None or ids(newer) == ids(manifest):
                raise
            if newer.renumbered != manifest.renumbered:  # row numbers of this snapshot mean other rows there
                raise StoreError(f"{backend.url}: the commit this handle was made from is gone, and a compaction "
                                 "that dropped rows renumbered the rows since; open the store (and build datasets "
                                 "over it) again") from e
            manifest = newer
            continue
        return snap, views, columns
    raise StoreError(f"{backend.url}: the manifest changed 100 times while being opened; try again")


def check_fingerprint(where: str, manifest: Manifest, want: str | None) -> None:
    if want is not None and manifest.fingerprint != want:
        raise StaleStoreError(
            f"{where}: the store was computed by model {manifest.fingerprint!r:.20}…, not by the given model "
            f"{want!r:.20}…; recompute it into a new path, or delete the store to overwrite it"
        )


def open_parts(backend: Backend, mode: str, fingerprint: str | None) -> tuple[Manifest, str, WriterLock | None]:
    """Read the manifest (writers: take the lock first, then delete what no commit references)."""
    lock = backend.lock() if mode == "a" else None
    try:
        manifest, token = read_head(backend)
        check_fingerprint(backend.url, manifest, fingerprint)
        if lock is not None:
            removed = remove_unreferenced(backend, manifest)
            if removed:
                log.info("%s: removed %d uncommitted leftovers of an interrupted writer", backend.url, len(removed))
        return manifest, token, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def create_new(backend: Backend, manifest: Manifest) -> tuple[str, WriterLock] | None:
    """Publish ``manifest`` as the first commit of a new store; returns (its token, the writer lock).

    None when a store is there already — also one another process created
    between the check and the lock: its manifest is never overwritten (that
    would orphan its commits).
    """
    if backend.exists():
        return None
    backend.before_create()
    lock = backend.lock()
    try:
        if backend.exists():
            lock.release()
            return None
        backend.initialize()
        head = Head(None, None)
        publish(backend, head, manifest)
    except BaseException:
        lock.release()
        raise
    return str(head.token), lock


def check_new(fields: Any, chunk_bytes: Any, fingerprint: Any, attrs: Any) -> dict[str, Field]:
    """The arguments of :func:`actstore.create`, checked; returns the fields."""
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError("fields: expected a non-empty dict of name -> actstore.Field")
    checked: dict[str, Field] = {}
    for name, f in fields.items():
        name_argument(name, "fields")
        if not isinstance(f, Field):
            raise TypeError(f"fields[{name!r}]: expected an actstore.Field, got {type(f).__name__}")
        checked[name] = f
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")
    for name, f in checked.items():
        if f.compression is not None and max(f.row_bytes, min(chunk_bytes, 1 << 62)) > MAX_INNER_CHUNK_BYTES:
            raise ValueError(f"fields[{name!r}]: a compressed field's inner chunks (chunk_bytes, or one row of "
                             f"{f.row_bytes:,} bytes) may hold at most {MAX_INNER_CHUNK_BYTES:,} bytes")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint: expected a str (actstore.fingerprint(model)) or None, got {type(fingerprint).__name__}")
    try:
        json.dumps(dict(attrs or {}), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"attrs: must be JSON-serialisable ({e})") from e
    return checked
