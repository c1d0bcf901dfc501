"""Exceptions raised by actstore.

Every error derives from :class:`StoreError`; leaves also inherit the builtin
that matches them, so ``except FileNotFoundError`` or ``except ValueError`` in
caller code keeps working.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "CastOverflowError",
    "CorruptStoreError",
    "DatasetMismatchError",
    "FactoryError",
    "HeadInputError",
    "LeftPaddingError",
    "MissingDependencyError",
    "MissingRowsError",
    "NoAugmentationsError",
    "PreconditionFailed",
    "RemoteError",
    "SplitError",
    "StaleStoreError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedFormatError",
]


class StoreError(Exception):
    """Base class of every error raised by actstore."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path."""


class StoreExistsError(StoreError, FileExistsError):
    """A store (or another file) already exists where one was to be created."""


class CorruptStoreError(StoreError, ValueError):
    """Bytes or metadata on disk do not match what the store recorded."""


class UnsupportedFormatError(StoreError, ValueError):
    """The store was written in a format or version this library cannot read."""


class StaleStoreError(StoreError, ValueError):
    """The store was computed by a different model than the caller requires."""


class StoreLockedError(StoreError, BlockingIOError):
    """Another writer holds the store's lock."""


class RemoteError(StoreError, OSError):
    """Object storage refused a request or could not be reached (credentials, endpoint, network, timeout)."""


class MissingDependencyError(StoreError, ImportError):
    """An optional package is needed (for example s3fs for ``s3://`` URLs); the message names it."""


class DatasetMismatchError(StoreError, ValueError):
    """The wrapped dataset is not the one the store was computed from (``CachedDataset``)."""


class MissingRowsError(StoreError, LookupError):
    """Some dataset positions have no row in the store (and no fallback was given)."""


class PreconditionFailed(StoreError):
    """A conditional write or delete on object storage found the object created or changed by someone else."""


class FactoryError(StoreError, ValueError):
    """A command-line ``MODULE:FACTORY`` argument could not be loaded or called."""


class BenchError(StoreError, ValueError):
    """``actstore bench`` cannot run (bad model, bad depth, out of memory at the smallest batch size)."""


class SplitError(StoreError, TypeError):
    """A model cannot be split as asked (unknown layout, blocks that do not return the stream, tied weights)."""


class CastOverflowError(StoreError, ValueError, OverflowError):
    """Casting to a narrower store dtype would turn finite values into ±inf; the message names a dtype that holds them."""


class LeftPaddingError(StoreError, ValueError):
    """A left-padded batch for a model whose states depend on the padding side; pad on the right."""


class HeadInputError(StoreError, ValueError):
    """The head would not run on what the full model ran on: a padded batch without its mask, or a
    forward argument (non-default ``position_ids``) that the upper blocks read but a store does not hold."""


class NoAugmentationsError(StoreError, ValueError):
    """A CachedDataset asked for stored augmentations the store does not have (or for none of a store that has only
    augmentations); the message says how to add them or which to ask for."""


class UnsupportedCheckError(StoreError, NotImplementedError):
    """A check was asked that this store records nothing for (``check="items"`` over a store keyed by inputs)."""
