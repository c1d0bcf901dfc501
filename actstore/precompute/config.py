"""One precompute call's options, checked: :class:`PrecomputeConfig`.

:func:`actstore.precompute` checks its arguments once and builds this frozen
object (``precompute/api.py``); every module of the run reads its options from
it, grouped by what they decide:

- :class:`CaptureConfig`: what to capture (layers → fields, the token mask);
- :class:`ItemsConfig`: how items become model inputs, keys and side columns;
- :class:`StorageConfig`: how rows are stored (dtype, compression, quantisation,
  the range check of the cast, and whether a store that cannot be resumed may be replaced);
- :class:`ExecutionConfig`: how the forward runs (batch, device, workers, autocast);
- :class:`CommitConfig`: when rows are committed, and the final compaction (and reclaim).

A distributed rank derives its own with :func:`dataclasses.replace` (its device,
its progress bar).  No argument checking happens here: the values are the
checked ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from actstore.format.fields import Field
from actstore.format.record import RECORD_ATTR
from actstore.precompute.augment import AugmentSpec
from actstore.precompute.items import Selector

__all__ = [
    "ATTR",
    "STORE_DTYPES",
    "VIEW",
    "CaptureConfig",
    "CommitConfig",
    "ExecutionConfig",
    "ItemsConfig",
    "PrecomputeConfig",
    "StorageConfig",
]

#: Key of the precompute record in the store's attrs (actstore.format.record).
ATTR = RECORD_ATTR
#: The view that maps dataset positions to rows.
VIEW = "dataset"
#: ``store_dtype=`` choices.
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _frozen(mapping: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """What to capture: module names in forward order, each with its store field."""

    fields: Mapping[str, str]  #: registered module name → field name (ordered; ``""`` is the model's output)
    lengths_fn: Callable[[Any], Any] | None = None  #: per-sample token counts, for batches without attention_mask

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _frozen(self.fields))
        if len(set(self.fields.values())) != len(self.fields):
            raise ValueError(f"layers {list(self.fields)} map to clashing field names {list(self.fields.values())}")

    @property
    def layers(self) -> list[str]:
        """The module names, in order."""
        return list(self.fields)

    def layer_of(self, field_name: str) -> str:
        """The module whose output is stored in ``field_name`` (``"<final output>"`` for the model's output)."""
        return next(layer for layer, f in self.fields.items() if f == field_name) or "<final output>"


@dataclass(frozen=True, slots=True)
class ItemsConfig:
    """How a dataset item becomes a model input, a content key and side columns."""

    selector: Selector  #: where the input sits in an item
    collate_fn: Callable[[list[Any]], Any]  #: raw inputs → model batch
    key_fn: Callable[[Any], bytes] | None = None  #: None: actstore.key
    side_fields: Mapping[str, Field | None] = field(default_factory=dict)  #: side column → Field, or None to drop
    augment: AugmentSpec | None = None  #: K stored augmentations per sample (the dataset is AugmentedItems)

    def __post_init__(self) -> None:
        object.__setattr__(self, "side_fields", _frozen(self.side_fields))


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """How rows are stored, and what may be replaced."""

    store_dtype: torch.dtype | None = None  #: floating outputs on disk; None: the output's own dtype
    compression: str | None = None  #: None: raw (or, resuming, what the store has)
    quantize: str | None = None  #: None: unquantised (or, resuming, what the store has)
    overwrite: bool = False  #: replace a store (or leftover parts) that cannot be resumed
    allow_overflow: bool = False  #: clamp finite values beyond store_dtype's range instead of raising


@dataclass(frozen=True, slots=True)
class ExecutionConfig:
    """How the forward runs."""

    device: torch.device
    batch_size: int = 64
    num_workers: int = 0
    autocast: torch.dtype | None = None
    max_in_flight: int = 4  #: computed batches waiting for the writer thread
    progress: bool = True


@dataclass(frozen=True, slots=True)
class CommitConfig:
    """When rows become durable, and what happens after the last commit."""

    every_rows: int | None = None
    every_seconds: float | None = 60.0
    compact: bool = True  #: merge the segments into one at the end
    reclaim: bool = True  #: ... dropping the rows the previous dataset view referenced and no view does now


@dataclass(frozen=True, slots=True)
class PrecomputeConfig:
    """Every option of one :func:`actstore.precompute` call, checked (see the module docstring)."""

    capture: CaptureConfig
    items: ItemsConfig
    storage: StorageConfig
    execution: ExecutionConfig
    commits: CommitConfig = field(default_factory=CommitConfig)

    def describe(self, field_name: str) -> str:
        """How messages name a layer's field: ``field 'h' (layer 'encoder.layer.2')``."""
        return f"field {field_name!r} (layer {self.capture.layer_of(field_name)!r})"
