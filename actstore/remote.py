"""Stores on object storage: ``actstore.open("s3://bucket/store")`` and ``actstore.create("s3://...")``.

A remote store has exactly the layout of a local one (a Zarr v3 group: the
manifest in the root ``zarr.json``, immutable ``segments/``, ``indexes/`` and
``views/`` objects, ``lock/zarr.json``), so any Zarr v3 reader with an fsspec
store reads it too.

**Reading** (:func:`open_remote`, mode ``"r"``).  The manifest is downloaded,
and a local :class:`~actstore.storage.chunkcache.ChunkCache` mirror serves the reads:
an ordinary :class:`~actstore.ActivationStore` over the object-storage backend
(:class:`~actstore.storage.remote.ObjectBackend`), whose file hook downloads
each file whole (checked against its BLAKE3) the first time it is needed —
index runs and views at open, segment files on first use — so every later read
is a zero-copy memory map, as fast as a local store.
:meth:`ActivationStore.prefetch` downloads the files of given rows in background
threads.  ``cache_bytes`` bounds the segment files kept (least recently used
are evicted).  ``cache_dir=False`` keeps no chunk cache: rows are read through
zarr-python (``zarr.open_array`` over an fsspec store) on every access, a few
HTTP range requests per gather — slow but correct, and nothing but the small
index files touches the local disk (a temporary directory).

**Writing** (:func:`create_remote`, :func:`open_remote` mode ``"a"``).  Rows are
appended to a local staging store (the mirror).  :meth:`ActivationStore.commit`
commits locally, then uploads the commit's new immutable objects (segment,
key-index run, views), renews the writer lease, and writes the manifest *last*
— with ``If-Match`` on the manifest it started from.  A reader therefore sees
either the old commit or the new one, never part of one: each object PUT is
atomic and the manifest is the commit point.  ``commit()`` returns only after
the remote manifest is written.  An upload that fails leaves the remote store
at its previous commit; the next ``commit()`` or ``close()`` uploads again.
One writer at a time: :class:`~actstore.storage.lease.RemoteLock`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from actstore.engine.opening import check_new
from actstore.engine.prefetch import Prefetch
from actstore.format.fields import Field
from actstore.storage.backends import backend_for
from actstore.storage.lease import DEFAULT_LEASE_SECONDS
from actstore.storage.objects import is_url
from actstore.store import DEFAULT_CHUNK_BYTES, ActivationStore, create_in, open_in, push

__all__ = ["Prefetch", "RemoteStore", "create_remote", "is_url", "open_remote", "push"]

#: A store on object storage is an ordinary :class:`~actstore.ActivationStore` (the name is kept for callers).
RemoteStore = ActivationStore


def _url(url: str) -> str:
    if not is_url(url):
        raise ValueError(f"url: expected an object-storage URL such as s3://bucket/prefix, got {url!r}; "
                         "use actstore.open / actstore.create for local paths")
    return str(url)


def open_remote(
    url: str,
    mode: str = "r",
    *,
    fingerprint: str | None = None,
    verify_reads: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> ActivationStore:
    """Open a store on object storage (what :func:`actstore.open` does for a URL).

    Parameters
    ----------
    url
        ``s3://bucket/prefix`` or any fsspec URL.
    mode, fingerprint, verify_reads
        As for :func:`actstore.open`.  ``mode="a"`` takes the remote writer lease.
    cache_dir
        The local chunk cache: a directory, ``None`` for
        ``~/.cache/actstore/<hash of URL and endpoint>`` (``$ACTSTORE_CACHE_DIR``
        overrides the base), or ``False`` for none (reads go through zarr-python;
        a writer then stages in a temporary directory).
    cache_bytes
        Keep at most this many bytes of segment files in the cache (least
        recently used are evicted); ``None`` (default) keeps everything.
    storage_options
        Passed to the fsspec filesystem (``key``, ``secret``, ``endpoint_url``,
        ``config_kwargs`` …); by default credentials and endpoint come from the
        environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_ENDPOINT_URL``).
    lease_seconds
        Writers: the lock lease (renewed every third of it).

    Raises
    ------
    StoreNotFoundError, StoreLockedError, RemoteError, MissingDependencyError, CorruptStoreError
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
    if verify_reads and cache_dir is False and mode == "r":
        raise ValueError("verify_reads=True needs the chunk cache (files are checked whole); drop cache_dir=False")
    backend = backend_for(_url(url), cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options,
                          lease_seconds=lease_seconds)
    return open_in(backend, mode, fingerprint=fingerprint, verify_reads=verify_reads)


def create_remote(
    url: str,
    fields: Mapping[str, Field],
    *,
    fingerprint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    chunk_bytes: int | None = None,
    exist_ok: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> ActivationStore:
    """Create an empty store on object storage and open it for appending (what :func:`actstore.create` does for a URL).

    The prefix must hold no store (leftovers of an interrupted create are
    deleted; other objects make it refuse).  Other parameters as for
    :func:`actstore.create` and :func:`open_remote`.
    """
    chunk = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    checked = check_new(fields, chunk, fingerprint, attrs)
    backend = backend_for(_url(url), cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options,
                          lease_seconds=lease_seconds)
    return create_in(backend, checked, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk, exist_ok=exist_ok)
