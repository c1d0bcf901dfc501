"""actstore: layer recycling with an on-disk activation store.

Compute the outputs of a network's frozen layers once, keep them in a Zarr v3
store keyed by BLAKE3 content keys, and train the remaining layers from the
store with zero-copy reads.
"""

from __future__ import annotations

from .capture import LayerCapture, capture
from .data import ActivationCollate, ActivationDataset, PaddedBatch, collate
from .errors import (
    CorruptStoreError,
    DatasetMismatchError,
    MissingRowsError,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from .format import FORMAT_VERSION, Field
from .keys import fingerprint, key, keys
from .precompute import precompute
from .ragged import RaggedBatch
from .recycled import CachedDataset, RecycledEncoder
from .sampler import ChunkShuffleSampler
from .split import split, split_points
from .store import ActivationStore, create, open

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ActivationCollate",
    "ActivationDataset",
    "ActivationStore",
    "CachedDataset",
    "ChunkShuffleSampler",
    "CorruptStoreError",
    "DatasetMismatchError",
    "Field",
    "LayerCapture",
    "MissingRowsError",
    "PaddedBatch",
    "RaggedBatch",
    "RecycledEncoder",
    "StaleStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedFormatError",
    "__version__",
    "capture",
    "collate",
    "create",
    "fingerprint",
    "key",
    "keys",
    "open",
    "precompute",
    "split",
    "split_points",
]
