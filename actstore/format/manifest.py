"""The manifest: the commit point's document (docs/FORMAT.md §1-§2), its names and versions, parsed strictly.

This module is the executable half of ``docs/FORMAT.md``.  It never touches the
disk; :mod:`actstore.engine.write.segments`, :mod:`actstore.engine.commit` and :mod:`actstore.storage` do the I/O.  Everything
parsed from disk goes through :func:`parse_manifest` and friends, which accept
only the documented shapes and raise :class:`~actstore.errors.CorruptStoreError`
or :class:`~actstore.errors.UnsupportedFormatError` otherwise — never another
exception, and never code execution (JSON only, no pickle).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import CorruptStoreError, UnsupportedFormatError
from actstore.format.documents import bounded_int, check_id, check_name, dumps, expect, hex64, loads, only_keys
from actstore.format.fields import Field

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IndexRunInfo",
    "Manifest",
    "SegmentInfo",
    "group_document",
    "parse_manifest",
    "parse_root",
    "root_document",
]

FORMAT_NAME = "actstore"
#: The newest format version: a store whose rows were renumbered (a compaction that dropped rows) is written as
#: version 3, one with a quantised field as version 2 (FORMAT.md §1, §4.1, §9.2); every other store as version
#: 1, so that older readers still open it.
FORMAT_VERSION = 3
#: The versions this reader opens.
READ_VERSIONS = (1, 2, 3)
#: Key under the root group's ``attributes`` that holds the manifest.
MANIFEST_ATTR = "actstore"
SEGMENT_ATTR = "actstore_segment"
KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One committed, immutable segment: ``rows`` rows of every field."""

    id: str
    rows: int
    values: Mapping[str, int]  # ragged field -> number of stored elements
    meta: str  # BLAKE3 hex of the segment's zarr.json

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows, "values": dict(self.values), "meta": self.meta}


@dataclass(frozen=True, slots=True)
class IndexRunInfo:
    """A small immutable object of ``rows`` entries: a key-index run or a view."""

    id: str
    rows: int
    meta: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "rows": self.rows, "meta": self.meta}


@dataclass(frozen=True, slots=True)
class Manifest:
    """The commit point: everything a reader needs to open a snapshot."""

    fields: Mapping[str, Field]
    fingerprint: str | None
    attrs: Mapping[str, Any]
    created: str
    chunk_bytes: int
    generation: int = 0
    segments: tuple[SegmentInfo, ...] = ()
    indexes: tuple[IndexRunInfo, ...] = ()
    #: Named row lists (for example dataset position -> row), see ``ActivationStore.view``.
    views: Mapping[str, IndexRunInfo] = field(default_factory=dict)
    #: How many compactions renumbered rows (dropped rows, FORMAT.md §2): a row number holds only between
    #: commits with the same count.  Written only when not 0.
    renumbered: int = 0

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def version(self) -> int:
        """The format version this manifest is written as: 3 when rows were renumbered, 2 when a field is
        quantised, else 1."""
        if self.renumbered:
            return 3
        return 2 if any(f.quantize is not None for f in self.fields.values()) else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "fields": {k: f.to_json() for k, f in self.fields.items()},
            "fingerprint": self.fingerprint,
            "attrs": dict(self.attrs),
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "generation": self.generation,
            "rows": self.rows,
            "segments": [s.to_json() for s in self.segments],
            "indexes": [r.to_json() for r in self.indexes],
            "views": {k: v.to_json() for k, v in self.views.items()},
        } | ({"renumbered": self.renumbered} if self.renumbered else {})


def root_document(manifest: Manifest) -> bytes:
    """The root group's ``zarr.json``, carrying the manifest as an attribute."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {MANIFEST_ATTR: manifest.to_json()}}
    return dumps(doc)


def group_document(attributes: Mapping[str, Any] | None = None) -> bytes:
    return dumps({"zarr_format": 3, "node_type": "group", "attributes": dict(attributes or {})})


def parse_root(data: bytes, where: str) -> Manifest:
    """Parse the root ``zarr.json`` into a :class:`Manifest`, validating everything."""
    doc = expect(loads(data, where), dict, where)
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CorruptStoreError(f"{where}: not a Zarr v3 group document")
    attrs = expect(doc.get("attributes"), dict, f"{where}.attributes")
    if MANIFEST_ATTR not in attrs:
        raise CorruptStoreError(f"{where}: a Zarr group, but not an actstore store (no '{MANIFEST_ATTR}' attribute)")
    return parse_manifest(attrs[MANIFEST_ATTR], f"{where}.attributes.{MANIFEST_ATTR}")


def parse_manifest(doc: Any, where: str) -> Manifest:
    doc = expect(doc, dict, where)
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{where}: unsupported format {doc.get('format')!r}. Expected {FORMAT_NAME!r}.")
    version = doc.get("version")
    if type(version) is not int or version not in READ_VERSIONS:  # 1.0 and true equal 1 in Python
        raise UnsupportedFormatError(
            f"{where}: unsupported format version: got {version!r:.40}. Expected "
            f"{' or '.join(map(str, READ_VERSIONS))}. Upgrade actstore to read this store."
        )
    fields_doc = expect(doc.get("fields"), dict, f"{where}.fields")
    fields = {check_name(k, f"{where}.fields"): Field.from_json(v, f"{where}.fields.{k}", version)
              for k, v in fields_doc.items()}
    renumbered = bounded_int(doc.get("renumbered", 0), f"{where}.renumbered")
    if (version == 3) != (renumbered > 0):
        raise CorruptStoreError(f"{where}.renumbered: {renumbered} in a version-{version} manifest (a store whose "
                                "rows were renumbered is written as version 3, with renumbered >= 1, and only then)")
    if version == 2 and not any(f.quantize is not None for f in fields.values()):
        raise CorruptStoreError(f"{where}.version: 2, but no field is quantised (such a store is written as version 1)")
    if not fields:
        raise CorruptStoreError(f"{where}.fields: a store has at least one field")
    fp = doc.get("fingerprint")
    if fp is not None:
        expect(fp, str, f"{where}.fingerprint")
    segments = tuple(
        _parse_segment(s, fields, f"{where}.segments[{i}]")
        for i, s in enumerate(expect(doc.get("segments"), list, f"{where}.segments"))
    )
    runs = tuple(
        _parse_run(r, f"{where}.indexes[{i}]") for i, r in enumerate(expect(doc.get("indexes"), list, f"{where}.indexes"))
    )
    views_doc = expect(doc.get("views"), dict, f"{where}.views")
    views = {check_name(k, f"{where}.views"): _parse_run(v, f"{where}.views.{k}", lo=0) for k, v in views_doc.items()}
    ids = [s.id for s in segments] + [r.id for r in runs] + [v.id for v in views.values()]
    if len(set(ids)) != len(ids):
        raise CorruptStoreError(f"{where}: a segment or index id appears twice")
    manifest = Manifest(
        fields=fields,
        fingerprint=fp,
        attrs=expect(doc.get("attrs"), dict, f"{where}.attrs"),
        created=expect(doc.get("created"), str, f"{where}.created"),
        chunk_bytes=bounded_int(doc.get("chunk_bytes"), f"{where}.chunk_bytes", lo=1),
        generation=bounded_int(doc.get("generation"), f"{where}.generation"),
        segments=segments,
        indexes=runs,
        views=views,
        renumbered=renumbered,
    )
    if bounded_int(doc.get("rows"), f"{where}.rows") != manifest.rows:
        raise CorruptStoreError(f"{where}.rows: {doc.get('rows')} disagrees with the segments' {manifest.rows} rows")
    if sum(r.rows for r in runs) != manifest.rows:
        raise CorruptStoreError(f"{where}.indexes: the key index covers {sum(r.rows for r in runs)} rows, not {manifest.rows}")
    return manifest


def _parse_segment(doc: Any, fields: Mapping[str, Field], where: str) -> SegmentInfo:
    doc = expect(doc, dict, where)
    only_keys(doc, {"id", "rows", "values", "meta"}, where)
    values = expect(doc.get("values"), dict, f"{where}.values")
    ragged = {k for k, f in fields.items() if f.ragged}
    if set(values) != ragged:
        raise CorruptStoreError(f"{where}.values: expected counts for {sorted(ragged)}, got {sorted(values)}")
    return SegmentInfo(
        id=check_id(doc.get("id"), f"{where}.id"),
        rows=bounded_int(doc.get("rows"), f"{where}.rows", lo=1),
        values={k: bounded_int(v, f"{where}.values.{k}") for k, v in values.items()},
        meta=hex64(doc.get("meta"), f"{where}.meta"),
    )


def _parse_run(doc: Any, where: str, lo: int = 1) -> IndexRunInfo:
    doc = expect(doc, dict, where)
    only_keys(doc, {"id", "rows", "meta"}, where)
    return IndexRunInfo(
        id=check_id(doc.get("id"), f"{where}.id"),
        rows=bounded_int(doc.get("rows"), f"{where}.rows", lo=lo),
        meta=hex64(doc.get("meta"), f"{where}.meta"),
    )
