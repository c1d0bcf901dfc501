"""Which backend serves a path or URL, and backends rebuilt from their pickled state."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from actstore.storage.base import Backend
from actstore.storage.lease import DEFAULT_LEASE_SECONDS
from actstore.storage.local import LocalBackend
from actstore.storage.object_backend import ObjectBackend
from actstore.storage.objects import ObjectStore, is_url, local_path

__all__ = ["backend_for", "backend_from_state", "fspath"]


def fspath(path: str | os.PathLike[str]) -> str:
    """A local store's absolute directory (``file://`` URLs accepted)."""
    return os.path.abspath(local_path(os.fspath(path)))


def backend_for(url: str | os.PathLike[str], *, cache_dir: Any = None, cache_bytes: int | None = None,
                storage_options: Mapping[str, Any] | None = None,
                lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Backend:
    """The backend of a path (:class:`LocalBackend`) or URL (:class:`ObjectBackend`, with its chunk cache)."""
    if not is_url(url):
        return LocalBackend(fspath(url))
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(f"storage_options: expected a dict, got {type(storage_options).__name__}")
    return ObjectBackend(ObjectStore(str(url), storage_options), cache_dir, cache_bytes, lease_seconds=lease_seconds)


def backend_from_state(state: Mapping[str, Any]) -> Backend:
    """A backend again, from :meth:`Backend.state` (in a DataLoader worker)."""
    if state.get("kind") == "object":
        return ObjectBackend.from_state(state)
    return LocalBackend(state["root"])
