"""Deprecated: stores on object storage are opened by :func:`actstore.open` and :func:`actstore.create`.

Every name here warns (``DeprecationWarning``) and names its replacement.  The
remote protocol is described in :mod:`actstore.storage.object_backend`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from actstore.engine.read import prefetch as _prefetch
from actstore.format.fields import Field
from actstore.storage import objects as _objects
from actstore.store import api as _api
from actstore.store.handle import ActivationStore

__all__ = ["create_remote", "open_remote"]  # and, deprecated: RemoteStore, push, Prefetch, is_url

_MOVED = {  # name -> (the object, its replacement's name)
    "RemoteStore": (ActivationStore, "actstore.ActivationStore"),
    "push": (_api.push, "actstore.store.push"),
    "Prefetch": (_prefetch.Prefetch, "actstore.engine.read.prefetch.Prefetch"),
    "is_url": (_objects.is_url, "actstore.storage.objects.is_url"),
}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"actstore.remote.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        obj, new = _MOVED[name]
        _deprecated(name, new)
        return obj
    raise AttributeError(f"module 'actstore.remote' has no attribute {name!r}")


def _url(url: str) -> str:
    if not _objects.is_url(url):
        raise ValueError(f"url: expected an object-storage URL such as s3://bucket/prefix, got {url!r}; "
                         "use actstore.open / actstore.create for local paths")
    return str(url)


def open_remote(url: str, mode: str = "r", **options: Any) -> ActivationStore:
    """Deprecated: ``actstore.open(url, mode, ...)`` (same options, ``lease_seconds`` included)."""
    _deprecated("open_remote", "actstore.open(url, ...)")
    return _api.open(_url(url), mode, **options)


def create_remote(url: str, fields: Mapping[str, Field], *, chunk_bytes: int | None = None,
                  cache_dir: str | os.PathLike[str] | bool | None = None, **options: Any) -> ActivationStore:
    """Deprecated: ``actstore.create(url, fields, ...)`` (same options, ``lease_seconds`` included)."""
    _deprecated("create_remote", "actstore.create(url, ...)")
    if chunk_bytes is not None:
        options["chunk_bytes"] = chunk_bytes
    return _api.create(_url(url), fields, cache_dir=cache_dir, **options)
