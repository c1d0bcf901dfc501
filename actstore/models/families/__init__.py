"""The model families ``split`` knows, one module each, and the order it asks them in.

=====================================  ===============================================================
module                                 family
=====================================  ===============================================================
:mod:`.base`                           :class:`ModelFamily` (the interface), :class:`BlockFamily`,
                                       :class:`SplitPlan`, :func:`split_blocks`
:mod:`.sentence_transformers`          sentence-transformers models wrapping a table encoder
:mod:`.transformers`                   Hugging Face base models: the table of where blocks are
:mod:`.resnet`                         torchvision-style ResNets
:mod:`.sequential`                     plain ``nn.Sequential``
:mod:`.custom`                         any module, by protocol (``split(..., blocks=...)``)
=====================================  ===============================================================

To add a family: write a module with a :class:`ModelFamily` subclass (a
:class:`BlockFamily` when the model runs a list of blocks on a residual stream:
only ``detect`` and a :class:`~actstore.models.layout.BlockLayout` to write) and
put an instance in :data:`FAMILIES` before any family that would also detect
its models.
"""

from __future__ import annotations

from actstore.deprecation import moved_attributes
from actstore.models.families.base import BlockFamily, ModelFamily, SplitPlan, split_blocks
from actstore.models.families.custom import CustomFamily, custom_family
from actstore.models.families.resnet import ResNetFamily, ResNetPart
from actstore.models.families.sentence_transformers import SentenceTransformerHead, SentenceTransformersFamily
from actstore.models.families.sequential import SequentialFamily
from actstore.models.families.transformers import KNOWN_MODEL_TYPES, TransformersFamily, detect_family
from actstore.models.layout import BlockLayout

__all__ = [
    "FAMILIES",
    "KNOWN_MODEL_TYPES",
    "BlockFamily",
    "BlockLayout",
    "CustomFamily",
    "ModelFamily",
    "ResNetFamily",
    "ResNetPart",
    "SentenceTransformerHead",
    "SentenceTransformersFamily",
    "SequentialFamily",
    "SplitPlan",
    "TransformersFamily",
    "custom_family",
    "detect_family",
    "split_blocks",
]

FAMILIES: tuple[ModelFamily, ...] = (
    SentenceTransformersFamily(),
    TransformersFamily(),
    ResNetFamily(),
    SequentialFamily(),
)
"""The detected families, in the order ``split`` asks them: the first whose ``detect`` is true plans the model."""


__getattr__ = moved_attributes(__name__, {"Family": ("actstore.models.layout.BlockLayout", lambda: BlockLayout)})
