"""The on-disk format in code (docs/FORMAT.md): documents, names, codecs; no file I/O."""

from __future__ import annotations

from actstore.format.fields import Field
from actstore.format.manifest import FORMAT_NAME, FORMAT_VERSION, IndexRunInfo, Manifest, SegmentInfo, ViewInfo

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Field", "IndexRunInfo", "Manifest", "SegmentInfo", "ViewInfo"]
