"""The storage-backend interface: what the engine needs from the place a store lives.

A store is a manifest (the root ``zarr.json``) naming immutable objects
(``segments/<id>``, ``indexes/<id>``, ``views/<id>``).  The engine writes new
objects into :attr:`Backend.root`, a local directory, and reads files there
through memory maps; the backend decides how that directory relates to where
the store really lives:

- :class:`~actstore.storage.local.LocalBackend` — the store's own directory:
  objects are written in place, the manifest is replaced by an atomic rename
  under the ``flock`` writer lock.
- :class:`~actstore.storage.remote.ObjectBackend` — object storage: ``root`` is
  the chunk cache's mirror; files arrive there on demand (checked against the
  commit), new objects are uploaded data first, and the manifest last with a
  conditional put, under the leased lock.

The engine's commit (:mod:`actstore.engine.commit`) is the only caller of
:meth:`Backend.publish`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from actstore.format.layout import INDEXES_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.manifest import Manifest

__all__ = ["OBJECT_DIRS", "Backend", "FileProvider", "WriterLock", "objects_of", "referenced", "remove_unreferenced"]

log = logging.getLogger("actstore")

#: The directories that hold a store's immutable objects.
OBJECT_DIRS = (SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR)

#: The reader's hook: ``provide(object_dir, object_meta_blake3, file_names)`` makes those files of the object
#: present (and whole) under :attr:`Backend.root` before they are mapped.
FileProvider = Callable[[str, str, Sequence[str]], None]


class WriterLock(Protocol):
    """One writer at a time.  Held from ``open(mode="a")`` to ``close()``."""

    def check(self) -> None:
        """Raise :class:`~actstore.errors.StoreLockedError` if the lock was lost (a lease taken over)."""

    def release(self) -> None:
        """Give the lock up.  Never raises."""

    def finalize(self) -> None:
        """Give up what can be given up from a finaliser (no network).  Never raises."""


class Backend(abc.ABC):
    """Where a store lives.  One instance per store handle (see the module docstring)."""

    #: The local directory objects are written to and mapped from.
    root: str
    #: The store's name in messages (the directory, or the URL).
    url: str
    #: True when a failed :meth:`publish` leaves the commit staged in :attr:`root`, to be published again by the
    #: next commit or close (object storage); False when it is simply not committed (a local directory).
    stages: bool = False

    # -- the manifest ----------------------------------------------------------------------
    @abc.abstractmethod
    def read_manifest(self) -> tuple[bytes, str]:
        """The manifest's bytes and a version token.  Raises ``FileNotFoundError`` when there is none."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """True when a manifest is there."""

    def before_create(self) -> None:  # noqa: B027 - object storage checks everything under the lock
        """Checks and preparation before :meth:`lock` when a new store is being created here."""

    @abc.abstractmethod
    def publish(self, data: bytes, expected: str | None, new_objects: Sequence[str]) -> str:
        """Make ``data`` the manifest if the current one still has token ``expected`` (None: there is none).

        ``new_objects`` (``"segments/<id>"`` …) are the objects this manifest
        references that the expected one does not; they are complete under
        :attr:`root` and are made durable where the store lives before the
        manifest.  Returns the new token.  Raises
        :class:`~actstore.errors.StoreLockedError` when the predecessor is not
        ``expected`` (another writer committed): nothing is published then.
        """

    # -- files -----------------------------------------------------------------------------
    def provider(self) -> FileProvider | None:
        """The reader's file hook, or None when every file is already under :attr:`root`."""
        return None

    def segment_store(self) -> Any:
        """A read-only zarr-python store to read segment rows through instead of maps (no local copy), or None."""
        return None

    def on_evict(self, callback: Callable[[str], None]) -> None:  # noqa: B027 - only caches evict
        """Call ``callback(local_path)`` whenever a file under :attr:`root` is evicted (a size-bounded cache)."""

    @abc.abstractmethod
    def initialize(self) -> None:
        """Lay out an empty store (the object directories' group documents) before its first manifest.

        Called with the writer lock held.  Raises
        :class:`~actstore.errors.StoreExistsError` if the location holds anything else.
        """

    @abc.abstractmethod
    def list_objects(self, directory: str) -> list[str]:
        """Names of the objects in ``directory`` (one of :data:`OBJECT_DIRS`), without ``zarr.json``."""

    @abc.abstractmethod
    def delete_object(self, directory: str, name: str) -> None:
        """Delete one object (all its files).  Readers that mapped its files keep their maps."""

    def remove_leftovers(self, keep: set[str]) -> list[str]:
        """Delete what an interrupted writer may leave besides objects (temp files, a stale mirror)."""
        return []

    # -- the lock and the rest -------------------------------------------------------------
    @abc.abstractmethod
    def lock(self) -> WriterLock:
        """Take the writer lock.  Raises :class:`~actstore.errors.StoreLockedError` when another writer has it."""

    @abc.abstractmethod
    def size(self) -> int:
        """Bytes the store occupies where it lives."""

    @contextlib.contextmanager
    def fresh_files(self, manifest: Manifest, progress: Callable[[int], None]) -> Iterator[tuple[str, list[str] | None]]:
        """For ``verify``: yields (a directory holding every file of ``manifest`` as the store has it now,
        problems found while fetching them, or None when nothing was fetched and ``progress`` not called)."""
        yield self.root, None

    def info(self) -> dict[str, Any]:
        """Backend-specific entries for :meth:`ActivationStore.info`."""
        return {}

    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """What :func:`actstore.store.backend_from_state` needs to reopen this backend in another process."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release local resources (threads, temporary directories).  Never raises."""


def referenced(manifest: Manifest) -> set[str]:
    """Ids of every object the manifest names."""
    return {s.id for s in manifest.segments} | {r.id for r in manifest.indexes} | {v.id for v in manifest.views.values()}


def objects_of(manifest: Manifest) -> list[str]:
    """``"segments/<id>"`` … for every object the manifest names."""
    return ([f"{SEGMENTS_DIR}/{s.id}" for s in manifest.segments] + [f"{INDEXES_DIR}/{r.id}" for r in manifest.indexes]
            + [f"{VIEWS_DIR}/{v.id}" for v in manifest.views.values()])


def remove_unreferenced(backend: Backend, manifest: Manifest) -> list[str]:
    """Delete the objects (and leftovers) no commit references; returns what was removed.

    Called with the writer lock held, when a store is opened for appending: it
    cleans up after writers that died before their commit point.
    """
    keep = referenced(manifest)
    removed = []
    for sub in OBJECT_DIRS:
        for name in backend.list_objects(sub):
            if name not in keep:
                backend.delete_object(sub, name)
                removed.append(f"{sub}/{name}")
    removed += backend.remove_leftovers(keep)
    return removed
