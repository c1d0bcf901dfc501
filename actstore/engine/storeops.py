"""Whole-store operations on local stores: clone by hard links, and delete.

Both keep the manifest as the commit point: a clone's manifest is published
last, through :func:`actstore.engine.commit.publish` (a clone cut short has
none, and is not a store); a deleted store disappears by one rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

from actstore.engine.commit import Head, publish
from actstore.engine.opening import read_head
from actstore.errors import StoreExistsError
from actstore.format.layout import INDEXES_DIR, LOCK_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.manifest import Manifest
from actstore.storage.base import OBJECT_DIRS
from actstore.storage.files import object_files
from actstore.storage.local import LocalBackend, StoreLock, link_object

__all__ = ["clone_store", "delete_store"]

log = logging.getLogger("actstore")

_STORE_ENTRIES = {"zarr.json", *OBJECT_DIRS, LOCK_DIR}


def clone_store(src: str, dst: str) -> Manifest:
    """A copy of the committed store ``src`` at the new path ``dst``, made of hard links (copies where links fail).

    Returns the manifest (``src``'s last commit).  ``dst`` must not exist.
    """
    manifest = read_head(LocalBackend(src))[0]
    os.makedirs(dst)
    backend = LocalBackend(dst)
    lock = backend.lock()
    try:
        backend.initialize()
        objects = [(SEGMENTS_DIR, s.id, s.meta) for s in manifest.segments]
        objects += [(INDEXES_DIR, r.id, r.meta) for r in manifest.indexes]
        objects += [(VIEWS_DIR, v.id, v.meta) for v in manifest.views.values()]
        for sub, obj, meta in objects:
            base = os.path.join(src, sub, obj)
            _, files = object_files(base, meta, base)
            link_object(base, os.path.join(dst, sub, obj), files)
        publish(backend, Head(None, None), manifest)  # last: a clone cut short has no manifest
    finally:
        lock.release()
    return manifest


def delete_store(root: str) -> None:
    """Delete the local store at ``root``, refusing anything that is not one (or a store a writer is using)."""
    read_head(LocalBackend(root))  # raises unless root is a store
    extra = [n for n in os.listdir(root) if n not in _STORE_ENTRIES and not n.startswith(".zarr.json.")]
    if extra:
        raise StoreExistsError(f"{root}: holds files that are not part of the store ({', '.join(sorted(extra)[:5])}); "
                               "refusing to delete it — move them, or delete the directory yourself")
    lock = StoreLock(root)  # no writer may be using it
    try:
        trash = f"{root}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(root, trash)  # the store disappears atomically
    finally:
        lock.release()
    shutil.rmtree(trash, ignore_errors=True)
    log.info("%s: deleted the old store (overwrite=True)", root)
