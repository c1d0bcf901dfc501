"""``info()``: a store's summary, as a plain dict (what ``actstore info`` prints)."""

from __future__ import annotations

from typing import Any

from actstore.format.manifest import Manifest
from actstore.storage.base import Backend

__all__ = ["describe_store"]


def describe_store(m: Manifest, backend: Backend) -> dict[str, Any]:
    """Rows, fields, bytes where the store lives, fingerprint, layout, attributes (and the backend's extras)."""
    return {
        "path": backend.url,
        "format": f"actstore v{m.version} (Zarr v3)",
        "rows": m.rows,
        "fields": {n: {"shape": list(f.shape), "dtype": f.dtype, "ragged": f.ragged,
                       "compression": f"{f.compression} level {f.level}" if f.compression else None,
                       "quantize": f"{f.quantize}, float32 scale per {'token' if f.ragged else 'row'}"
                       if f.quantize else None}
                   for n, f in m.fields.items()},
        "bytes_on_disk": backend.size(),
        "fingerprint": m.fingerprint,
        "created": m.created,
        "generation": m.generation,
        "segments": len(m.segments),
        "index_runs": len(m.indexes),
        "views": {n: v.rows for n, v in m.views.items()},
        "chunk_bytes": m.chunk_bytes,
        "layout": "one shard per array per segment; "
                  + ("uncompressed little-endian rows from offset 0" if not any(f.compression for f in m.fields.values())
                     else "compressed fields: one zstd frame per inner chunk; others: raw rows from offset 0"),
        "attrs": dict(m.attrs),
        **backend.info(),
    }
