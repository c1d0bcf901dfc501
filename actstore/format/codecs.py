"""Codecs a field may be stored with (docs/FORMAT.md §5.1): names, levels, their Zarr v3 codec entries."""

from __future__ import annotations

from typing import Any

__all__ = ["CODECS", "LEVELS", "MAX_INNER_CHUNK_BYTES", "codec_json"]

#: Supported codec names and the zstd levels a field may ask for.
CODECS = ("zstd",)
LEVELS = range(-7, 23)

#: The largest decoded inner chunk: writers refuse more, readers call more corrupt (never allocate it).
MAX_INNER_CHUNK_BYTES = 1 << 30


def codec_json(level: int) -> dict[str, Any]:
    """The Zarr v3 codec entry of a zstd inner chunk (the form zarr-python writes)."""
    return {"name": "zstd", "configuration": {"level": level, "checksum": False}}
