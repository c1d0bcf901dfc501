"""The store's one face: :class:`ActivationStore` and the functions that open, create and push stores.

- :mod:`actstore.store.handle` — :class:`ActivationStore`: the committed
  snapshot it reads and, in append mode, the
  :class:`~actstore.engine.write.writer.StoreWriter` it delegates writing to.
- :mod:`actstore.store.api` — :func:`open`, :func:`create`, :func:`push`.
"""

from __future__ import annotations

from actstore.engine.lifecycle.storeops import clone_store, delete_store
from actstore.store.api import DEFAULT_CHUNK_BYTES, create, create_in, open, push, read_manifest
from actstore.store.handle import ActivationStore, open_in

__all__ = ["DEFAULT_CHUNK_BYTES", "ActivationStore", "clone_store", "create", "create_in", "delete_store", "open",
           "open_in", "push", "read_manifest"]
