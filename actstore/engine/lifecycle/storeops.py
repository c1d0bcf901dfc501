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
from actstore.engine.lifecycle.opening import read_head
from actstore.errors import StoreError, StoreExistsError, StoreNotFoundError
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


def delete_store(root: str, *, missing_ok: bool = False) -> bool:
    """Delete the local store at ``root`` for an ``overwrite=True``: the one place such a delete happens.

    Deletes only what actstore made: a directory holding an actstore store
    (its manifest readable, no other files beside it, no writer using it), the
    directories a ``create()`` cut short left (no manifest yet), or an empty
    directory.  Anything else raises :class:`StoreExistsError` naming the path
    and saying that nothing was deleted.  Returns True when something was
    deleted; False for a missing ``root`` with ``missing_ok``.
    """
    if not os.path.lexists(root):
        if missing_ok:
            return False
        raise StoreNotFoundError(f"{root}: no store here to delete")
    if os.path.islink(root) or not os.path.isdir(root):
        raise StoreExistsError(f"{root}: is not a directory (a file or a link), so not an actstore store; nothing was "
                               "deleted — pick another path, or delete it yourself")
    entries = os.listdir(root)
    if not entries:
        os.rmdir(root)
        return True
    if not os.path.lexists(os.path.join(root, "zarr.json")):
        if not _create_cut_short(root, entries):
            raise StoreExistsError(
                f"{root}: is not an actstore store (no manifest zarr.json) and holds {len(entries)} entries "
                f"({', '.join(sorted(entries)[:5])}); nothing was deleted — pick another path, or delete it yourself")
    else:
        try:
            read_head(LocalBackend(root))  # raises unless root is a store
        except StoreError as e:
            raise StoreExistsError(f"{root}: its zarr.json is not the manifest of an actstore store ({e}); nothing "
                                   "was deleted — pick another path, or delete it yourself") from e
    extra = [n for n in entries if n not in _STORE_ENTRIES and not n.startswith(".zarr.json.")]
    if extra:
        raise StoreExistsError(f"{root}: holds files that are not part of the store ({', '.join(sorted(extra)[:5])}); "
                               "refusing to delete it, nothing was deleted — move them, or delete the directory "
                               "yourself")
    lock = StoreLock(root)  # no writer may be using it
    try:
        trash = f"{root}.deleting-{uuid.uuid4().hex[:8]}"
        os.rename(root, trash)  # the store disappears atomically
    finally:
        lock.release()
    shutil.rmtree(trash, ignore_errors=True)
    log.info("%s: deleted the old store (overwrite=True)", root)
    return True


def _create_cut_short(root: str, entries: list[str]) -> bool:
    """True when ``root`` holds only what a ``create()`` killed before its manifest leaves: the store's directories,
    each holding nothing but group documents and object directories named by hex ids."""
    if set(entries) - {*OBJECT_DIRS, LOCK_DIR}:
        return False
    for name in entries:
        d = os.path.join(root, name)
        if os.path.islink(d) or not os.path.isdir(d):
            return False
        for inner in os.listdir(d):
            if inner != "zarr.json" and not (len(inner) == 32 and all(c in "0123456789abcdef" for c in inner)):
                return False
    return True
