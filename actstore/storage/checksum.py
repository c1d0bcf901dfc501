"""File checksums: the one place that names the algorithm (BLAKE3, as lowercase hex; docs/FORMAT.md).

A commit records the size and checksum of every file it writes (the
``"blake3"`` entry of a file record), and names each object's ``zarr.json`` by
its checksum; a local manifest's version token, the emulated ETag of a
filesystem without one and the chunk cache's directory names are checksums
too.  Content keys of samples are another thing: :mod:`actstore.format.keys`.
"""

from __future__ import annotations

import blake3

__all__ = ["Hasher", "checksum", "hash_file", "new_hasher"]

#: An incremental checksum: ``update(data)`` (thread-safe to call from a helper thread), ``hexdigest()``.
Hasher = blake3.blake3

#: Files at least this large are hashed on several threads.
_THREADS_MIN = 1 << 22


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum of ``data``, as hex."""
    return blake3.blake3(data).hexdigest()


def new_hasher() -> Hasher:
    """A new incremental checksum (feed it with ``update``, read it with ``hexdigest``)."""
    return blake3.blake3()


def hash_file(path: str, size: int) -> str:
    """The checksum of the file at ``path`` (``size`` bytes long), read through a memory map."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= _THREADS_MIN else 1)
    if size:
        h.update_mmap(path)
    return h.hexdigest()
