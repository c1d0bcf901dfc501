"""Rows a :class:`~actstore.training.encoder.RecycledEncoder` computes in DataLoader workers: one part store each.

A store has one writer, the process that opened it; a DataLoader worker (forked
or spawned) holds no lock on it and may not write to it.  So an encoder used in
a worker appends its misses to a **part** of its own — an ordinary store
beside the main one, ``<store>.worker-parts/w<pid>-<id>`` — committed every
``commit_every_rows`` rows and when the worker exits (a ``multiprocessing``
finaliser, run by fork and spawn workers alike).  The encoder in the process
that opened the store adopts every finished part (:meth:`ActivationStore.adopt`:
whole segments hard-linked, keys already stored skipped, so a sample computed
by two workers is stored once) when it commits or closes, and when it is made;
a part still written by a live worker is locked, and left for a later adopt.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

from actstore.engine.lifecycle.storeops import delete_store
from actstore.errors import StoreError, StoreLockedError
from actstore.format.fields import Field
from actstore.storage.checksum import checksum
from actstore.storage.objects import is_url
from actstore.store import ActivationStore, create
from actstore.store import open as open_store

__all__ = ["WorkerPart", "adopt_parts", "parts_dir"]

log = logging.getLogger("actstore")


def parts_dir(path: str) -> str:
    """Where workers' parts of the store at ``path`` go: beside it (or, for a URL, under the temp directory)."""
    if is_url(path):
        return os.path.join(tempfile.gettempdir(), "actstore-worker-parts", checksum(path.encode())[:16])
    return f"{path.rstrip(os.sep)}.worker-parts"


class WorkerPart:
    """This worker's part store, created on its first row, committed and closed when the worker exits."""

    def __init__(self, main_path: str) -> None:
        self.dir = parts_dir(main_path)
        self.store: ActivationStore | None = None

    def append(self, keys: Any, values: Mapping[str, Any], fields: Mapping[str, Field], fingerprint: str | None,
               attrs: Mapping[str, Any], commit_every_rows: int) -> bool:
        """Append rows (the main store's fields); commit every ``commit_every_rows`` pending rows (returns True)."""
        if self.store is None:
            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, f"w{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self.store = create(path, dict(fields), fingerprint=fingerprint, attrs=dict(attrs))
            self.store.merge_policy = None  # the adopting store merges
            multiprocessing.util.Finalize(self, _close, args=(self.store,), exitpriority=10)
        self.store.append(keys, values)
        if self.store.pending >= commit_every_rows:
            self.store.commit()
            return True
        return False

    def commit(self) -> int | None:
        """Commit the part's pending rows; returns its generation (None before its first row)."""
        return self.store.commit() if self.store is not None else None

    def close(self) -> None:
        if self.store is not None:
            _close(self.store)


def _close(store: ActivationStore) -> None:
    with contextlib.suppress(Exception):  # (at a worker's exit: never raise)
        store.close()


def adopt_parts(main_path: str, main: ActivationStore | None) -> ActivationStore | None:
    """Adopt every finished worker part of the store at ``main_path`` into ``main`` (created like the first part
    when None), deleting each part after its rows are committed; returns ``main``.

    A part whose worker still writes (its lock is held) is left for a later call.
    """
    root = parts_dir(main_path)
    if not os.path.isdir(root):
        return main
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        try:
            part = open_store(path, mode="a")  # the lock: a live worker's part is refused
        except StoreLockedError:
            continue
        except StoreError:  # created but never committed (its worker died at once): nothing to adopt
            with contextlib.suppress(OSError, StoreError):
                delete_store(path)
            continue
        try:
            if main is None:
                main = create(main_path, dict(part.fields), fingerprint=part.fingerprint, exist_ok=True,
                              attrs=dict(part.attrs))
            if len(part):
                main.adopt(part)
        finally:
            part.close()
        delete_store(path)
        log.debug("%s: adopted the worker part %s", main_path, name)
    with contextlib.suppress(OSError):
        os.rmdir(root)
    return main
