"""actstore: layer recycling with an on-disk activation store.

Compute the outputs of a network's frozen layers once, keep them in a Zarr v3
store keyed by BLAKE3 content keys, and train the remaining layers from the
store with zero-copy reads.
"""

from __future__ import annotations

from actstore.engine.lifecycle.compaction import TieredMerge
from actstore.engine.read.ragged import RaggedBatch
from actstore.errors import (
    CastOverflowError,
    CorruptStoreError,
    DatasetMismatchError,
    MissingRowsError,
    NoAugmentationsError,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from actstore.format.fields import Field
from actstore.format.keys import fingerprint, key, keys
from actstore.format.manifest import FORMAT_VERSION
from actstore.models.capture import LayerCapture, capture
from actstore.models.split import split, split_points
from actstore.precompute.api import precompute
from actstore.precompute.augment import augment_generator
from actstore.store import ActivationStore, create, open
from actstore.training.adapters import lora, trainable_parameters
from actstore.training.augmented import EpochSampler
from actstore.training.collate import ActivationCollate, PaddedBatch, collate
from actstore.training.datasets import ActivationDataset
from actstore.training.encoder import RecycledEncoder
from actstore.training.inference import infer
from actstore.training.recycle import recycle, unrecycle
from actstore.training.recycled import CachedDataset
from actstore.training.sampler import ChunkShuffleSampler

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ActivationCollate",
    "ActivationDataset",
    "ActivationStore",
    "CachedDataset",
    "CastOverflowError",
    "ChunkShuffleSampler",
    "CorruptStoreError",
    "DatasetMismatchError",
    "EpochSampler",
    "Field",
    "LayerCapture",
    "MissingRowsError",
    "NoAugmentationsError",
    "PaddedBatch",
    "RaggedBatch",
    "RecycledEncoder",
    "StaleStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "TieredMerge",
    "UnsupportedFormatError",
    "__version__",
    "augment_generator",
    "capture",
    "collate",
    "create",
    "fingerprint",
    "infer",
    "key",
    "keys",
    "lora",
    "open",
    "precompute",
    "recycle",
    "split",
    "split_points",
    "trainable_parameters",
    "unrecycle",
]
