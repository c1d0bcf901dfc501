"""actstore: layer recycling with an on-disk activation store.

Compute the outputs of a network's frozen layers once, keep them in a Zarr v3
store keyed by BLAKE3 content keys, and train the remaining layers from the
store with zero-copy reads.
"""

from __future__ import annotations

from .errors import (
    CorruptStoreError,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from .format import FORMAT_VERSION, Field
from .keys import fingerprint, key, keys
from .ragged import RaggedBatch
from .store import ActivationStore, create, open

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ActivationStore",
    "CorruptStoreError",
    "Field",
    "RaggedBatch",
    "StaleStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedFormatError",
    "__version__",
    "create",
    "fingerprint",
    "key",
    "keys",
    "open",
]
