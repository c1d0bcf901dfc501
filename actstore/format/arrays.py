"""Zarr v3 array metadata: every array is one shard of raw little-endian inner chunks (docs/FORMAT.md §2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["array_metadata", "chunk_path", "inner_rows_for", "shard_layout"]


# --- arrays ------------------------------------------------------------------
#
# Every array is stored as ONE shard (Zarr's sharding codec) whose inner chunks
# use the ``bytes`` codec only.  The shard file therefore starts with the rows
# back to back in C order, so one memory map of the file is one row array; the
# shard index (16 bytes per inner chunk) and its CRC32C follow the data.


def shard_layout(rows: int, inner_rows: int) -> tuple[int, int]:
    """(shard_rows, inner_chunks) for an array of ``rows`` rows."""
    inner = max(1, math.ceil(rows / inner_rows))
    return inner * inner_rows, inner


def array_metadata(
    rows: int, inner_shape: tuple[int, ...], zarr_dtype: str, inner_rows: int, attributes: Mapping[str, Any] | None = None,
    codec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``zarr.json`` of a single-shard array of ``rows`` rows.

    An empty array (``rows == 0``) gets a one-row chunk grid and no shard file.
    ``codec`` (see :attr:`Field.codec`) compresses each inner chunk after ``bytes``.
    """
    inner_codecs: list[Any] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec is not None:
        inner_codecs.append(dict(codec))
    shard_rows, _ = shard_layout(rows, inner_rows)
    fill: object = False if zarr_dtype == "bool" else 0
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [rows, *inner_shape],
        "data_type": zarr_dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *inner_shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [inner_rows, *inner_shape],
                    "codecs": inner_codecs,
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": dict(attributes or {}),
    }


def chunk_path(ndim: int) -> str:
    """Path of the (only) shard file of an ``ndim``-dimensional array."""
    return "c/" + "/".join("0" for _ in range(ndim))


def inner_rows_for(row_bytes: int, chunk_bytes: int, rows: int) -> int:
    """Rows per inner chunk: about ``chunk_bytes``, never more than the array has."""
    return max(1, min(max(rows, 1), chunk_bytes // max(row_bytes, 1)))
