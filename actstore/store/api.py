"""Opening and creating stores: :func:`open`, :func:`create` and :func:`push`, for a path or a URL."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

from actstore.engine.lifecycle.opening import backend_to_open, check_new, create_new, read_head
from actstore.engine.write.writer import describe_fields
from actstore.errors import StoreExistsError
from actstore.format.fields import Field
from actstore.format.manifest import Manifest
from actstore.storage.backends import backend_for
from actstore.storage.base import Backend
from actstore.storage.lease import DEFAULT_LEASE_SECONDS
from actstore.storage.local import LocalBackend
from actstore.store.handle import ActivationStore, open_in

__all__ = ["DEFAULT_CHUNK_BYTES", "create", "create_in", "open", "push", "read_manifest"]

#: Default bytes per inner chunk (what a generic Zarr reader fetches at a time).
DEFAULT_CHUNK_BYTES = 1 << 20


def read_manifest(root: str) -> Manifest:
    """The manifest of the local store at ``root``."""
    return read_head(LocalBackend(root))[0]


def create(
    path: str | os.PathLike[str],
    fields: Mapping[str, Field],
    *,
    fingerprint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    exist_ok: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float | None = None,
) -> ActivationStore:
    """Create an empty store and open it for appending.

    Parameters
    ----------
    path
        A directory that does not exist yet, or an empty one.
    fields
        Field name → :class:`Field`.  Names use letters, digits, ``_ . -``.
    fingerprint
        The frozen model's :func:`actstore.fingerprint`, checked by readers that
        pass ``fingerprint=`` to :func:`open`.
    attrs
        JSON-serialisable metadata kept with the store.
    chunk_bytes
        Size of the inner chunks other Zarr readers fetch; actstore itself maps
        whole shards and does not care.
    exist_ok
        Open an existing store with the same fields instead of raising.
    cache_dir, cache_bytes, storage_options, lease_seconds
        For a URL (``s3://bucket/prefix`` or any fsspec URL) only: see
        :func:`open`.  Ignored for local paths.

    Raises
    ------
    StoreExistsError
        The path holds a store or other files (unless ``exist_ok`` and the store's
        fields match).

    Examples
    --------
    >>> import actstore, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with actstore.create(d + "/s", {"h": actstore.Field((4,), "float16")}) as s:
    ...     s.append([actstore.key("a")], {"h": [[1, 2, 3, 4]]})
    1
    >>> len(actstore.open(d + "/s"))
    1
    """
    checked = check_new(fields, chunk_bytes, fingerprint, attrs)
    backend = backend_for(path, cache_dir=cache_dir, cache_bytes=cache_bytes, storage_options=storage_options,
                          lease_seconds=DEFAULT_LEASE_SECONDS if lease_seconds is None else lease_seconds)
    return create_in(backend, checked, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk_bytes, exist_ok=exist_ok)


def create_in(backend: Backend, fields: dict[str, Field], *, fingerprint: str | None = None,
              attrs: Mapping[str, Any] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              exist_ok: bool = False) -> ActivationStore:
    """:func:`create` on a given backend (arguments already checked)."""
    manifest = Manifest(fields=fields, fingerprint=fingerprint, attrs=dict(attrs or {}),
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), chunk_bytes=chunk_bytes)
    got = create_new(backend, manifest)
    if got is not None:
        return ActivationStore(backend, manifest, mode="a", lock=got[1], token=got[0])
    if not exist_ok:
        backend.close()
        raise StoreExistsError(f"{backend.url}: a store already exists; open it with actstore.open(path, mode='a')")
    store = open_in(backend, "a", fingerprint=fingerprint)
    if dict(store.fields) != fields:
        store.close()
        raise StoreExistsError(
            f"{backend.url}: a store with other fields exists ({describe_fields(store.fields)}; wanted "
            f"{describe_fields(fields)})")
    return store


def open(  # noqa: A001 - mirrors zarr.open / builtins.open on purpose
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    fingerprint: str | None = None,
    verify_reads: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    lease_seconds: float | None = None,
) -> ActivationStore:
    """Open a store.

    Parameters
    ----------
    path
        The store's directory, or a URL (``s3://bucket/prefix`` or any fsspec
        URL): the store is then read through a local chunk cache and written
        through a local staging store (the protocol:
        :mod:`actstore.storage.object_backend`).
    mode
        ``"r"`` to read a snapshot of the last commit, ``"a"`` to append (takes the
        writer lock and deletes files left by writers that crashed before
        committing).
    fingerprint
        If given, the store must have been computed by a model with this
        :func:`actstore.fingerprint`.
    verify_reads
        Check every file against its commit's BLAKE3 the first time this handle
        maps it (one extra read of each file used): damaged bytes then raise
        :class:`CorruptStoreError` instead of being returned.  Off by default.
    cache_dir
        URLs only (ignored for local paths): the local chunk cache, a directory;
        ``None`` for ``~/.cache/actstore/<hash of URL and endpoint>``
        (``$ACTSTORE_CACHE_DIR`` overrides the base), or ``False`` for none
        (reads go through zarr-python; a writer then stages in a temporary
        directory).
    cache_bytes
        URLs only: keep at most this many bytes of segment files in the cache
        (least recently used are evicted); ``None`` keeps everything.
    storage_options
        URLs only: passed to the fsspec filesystem (``key``, ``secret``,
        ``endpoint_url``, ``config_kwargs`` …); by default credentials and
        endpoint come from the environment (``AWS_ACCESS_KEY_ID``,
        ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
    lease_seconds
        URLs only, writers: the lock lease (renewed every third of it; default 60 s).

    Raises
    ------
    StoreNotFoundError, CorruptStoreError, UnsupportedFormatError, StaleStoreError, StoreLockedError

    Opening reads one small document and maps a few index files: its cost does
    not grow with the number of rows.
    """
    backend = backend_to_open(path, mode, verify_reads=verify_reads, cache_dir=cache_dir, cache_bytes=cache_bytes,
                              storage_options=storage_options, lease_seconds=lease_seconds)
    return open_in(backend, mode, fingerprint=fingerprint, verify_reads=verify_reads)


def push(source: str | os.PathLike[str], url: str, *, cache_dir: str | os.PathLike[str] | bool | None = None,
         storage_options: Mapping[str, Any] | None = None) -> int:
    """Upload a local store to object storage: create the remote store, or add to it; returns the rows added.

    The local store's segments are uploaded as they are (no row is rewritten),
    its views are carried over (mapped to the remote store's rows), and the
    remote manifest is written last, in one commit.  The usual workflow:
    precompute to a local or shared path (with ``torchrun`` for many GPUs),
    then ``actstore push PATH s3://bucket/store`` and train from the URL.
    """
    src = open(source)
    try:
        dst = create(url, dict(src.fields), fingerprint=src.fingerprint, attrs=dict(src.attrs),
                     chunk_bytes=src.manifest.chunk_bytes, exist_ok=True, cache_dir=cache_dir,
                     storage_options=storage_options)
        try:
            n = dst.adopt(src)
            dst.carry_views(src)
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
    return n
