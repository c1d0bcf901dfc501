"""Warming a remote store's chunk cache ahead of reads, and forgetting evicted files.

Only stores on object storage have a cache to warm: for a local store
:func:`prefetch` has nothing to do.
"""

from __future__ import annotations

import concurrent.futures
import os
import weakref
from typing import Any

import numpy as np

from actstore.format.arrays import chunk_path
from actstore.format.layout import FIELDS_DIR, SEGMENTS_DIR, field_arrays
from actstore.storage.chunkcache import ChunkCache

__all__ = ["Prefetch", "forget_on_evict", "prefetch"]


class Prefetch:
    """Background downloads started by :meth:`ActivationStore.prefetch`."""

    def __init__(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        self.futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the downloads; returns the bytes downloaded (re-raises a download's error)."""
        done, pending = concurrent.futures.wait(self.futures, timeout)
        if pending:
            raise TimeoutError(f"prefetch: {len(pending)} of {len(self.futures)} downloads still running")
        return sum(f.result() for f in self.futures if not f.cancelled())

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


def prefetch(store: Any, rows: Any, names: list[str], keys: bool) -> Prefetch:
    """Queue the downloads of the files that reading ``rows`` of fields ``names`` will need (see the method)."""
    cache: ChunkCache | None = getattr(store.backend, "cache", None)
    snap = store.snapshot
    if cache is None or getattr(store.backend, "lazy", False) or not snap.segments:
        return Prefetch([])
    if rows is None:
        order = np.arange(len(snap.segments))
    else:
        idx = snap.check_rows(rows)
        seg = np.searchsorted(snap.starts, idx, side="right") - 1
        _, first = np.unique(seg, return_index=True)
        order = seg[np.sort(first)]
    budget = [int(cache.cache_bytes * 0.8) if cache.cache_bytes is not None else None]
    futures = []
    for s in order.tolist():
        info = snap.segments[s].info
        files = [f"keys/{chunk_path(2)}"] if keys else []
        for n in names:
            for a in field_arrays(n, store.fields[n]):
                if a.rows(info.rows, info.values.get(n, 0)):  # an empty array has no data file
                    files.append(f"{a.rel}/{chunk_path(len(a.inner) + 1)}")
        futures.append(cache.submit(_prefetch_one, cache, f"{SEGMENTS_DIR}/{info.id}", info.meta, files, budget))
    return Prefetch(futures)


def _prefetch_one(cache: ChunkCache, obj: str, meta: str, files: list[str], budget: list[int | None]) -> int:
    records = cache.records(obj, meta)
    if budget[0] is not None:
        need = sum(records[f]["size"] for f in files if f in records)
        if need > budget[0]:
            return 0
        budget[0] -= need  # (approximate under threads: a budget, not a guarantee)
    return cache.ensure(obj, meta, files)


def forget_on_evict(store: Any) -> Any:
    """The cache's eviction callback for ``store``: drop its maps of an evicted file (views handed out keep theirs)."""
    ref = weakref.ref(store)

    def forget(path: str) -> None:
        s = ref()
        if s is None or s._closed:
            return
        rel = os.path.relpath(path, os.path.join(s.path, SEGMENTS_DIR)).replace(os.sep, "/")
        seg_id, _, inner = rel.partition("/")
        name = inner.rsplit("/c/", 1)[0]
        keys = ["keys"] if name == "keys" else []
        if name.startswith(FIELDS_DIR + "/"):
            field = name[len(FIELDS_DIR) + 1:]
            base = field.rsplit("/", 1)[0] if field.endswith(("/values", "/offsets", "/scales")) else field
            keys = [base, base + "/offsets", base + "/scales"]
        s.snapshot.forget(seg_id, keys)

    return forget
