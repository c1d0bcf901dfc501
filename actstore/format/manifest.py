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
    "ViewInfo",
    "group_document",
    "parse_manifest",
    "parse_root",
    "root_document",
]

FORMAT_NAME = "actstore"
#: The newest format version: a store with a view that has columns (side values per dataset position, FORMAT.md §8)
#: or whose rows were renumbered (a compaction that dropped rows, §9.2) is written as version 3; else one with a
#: quantised field as version 2 (§4.1); every other store as version 1, so that older readers still open it.
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
class ViewInfo(IndexRunInfo):
    """A view: ``rows`` entries of ``row`` (position -> row), and optionally columns per position (version 3).

    ``columns`` are laid out like a segment's fields (fixed: ``[rows, *shape]``;
    ragged: values + offsets; FORMAT.md §8), ``values`` holds each ragged
    column's element count, and ``item_key`` says whether the view also holds
    ``item_key``: uint8 ``[rows, 32]``, the key of each position's input.
    """

    columns: Mapping[str, Field] = field(default_factory=dict)
    values: Mapping[str, int] = field(default_factory=dict)
    item_key: bool = False

    @property
    def has_columns(self) -> bool:
        """Whether this view has more than its ``row`` array (a version 3 view)."""
        return bool(self.columns) or self.item_key

    def to_json(self) -> dict[str, Any]:
        doc = {"id": self.id, "rows": self.rows, "meta": self.meta}
        if self.has_columns:
            doc.update(columns={k: f.to_json() for k, f in self.columns.items()}, values=dict(self.values),
                       item_key=self.item_key)
        return doc


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
    views: Mapping[str, ViewInfo] = field(default_factory=dict)
    #: How many compactions renumbered rows (dropped rows, FORMAT.md §9.2): a row number holds only between
    #: commits with the same count.  Written only when not 0.
    renumbered: int = 0

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def version(self) -> int:
        """The format version this manifest is written as: 3 when a view has columns or rows were renumbered, else
        2 when a field is quantised, else 1."""
        if self.renumbered or any(v.has_columns for v in self.views.values()):
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
            f"{', '.join(map(str, READ_VERSIONS[:-1]))} or {READ_VERSIONS[-1]}. Upgrade actstore to read this store."
        )
    fields_doc = expect(doc.get("fields"), dict, f"{where}.fields")
    fields = {check_name(k, f"{where}.fields"): Field.from_json(v, f"{where}.fields.{k}", version)
              for k, v in fields_doc.items()}
    renumbered = bounded_int(doc.get("renumbered", 0), f"{where}.renumbered")
    if renumbered and version != 3:
        raise CorruptStoreError(f"{where}.renumbered: {renumbered} in a version-{version} manifest (a store whose "
                                "rows were renumbered is written as version 3)")
    if version == 2 and not any(f.quantize is not None for f in fields.values()):  # (3 may have quantised fields)
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
    views = {check_name(k, f"{where}.views"): _parse_view(v, f"{where}.views.{k}", version)
             for k, v in views_doc.items()}
    if version == 3 and not renumbered and not any(v.has_columns for v in views.values()):
        raise CorruptStoreError(f"{where}.version: 3, but no view has columns and no rows were renumbered (such a "
                                "store is written as version 1 or 2)")
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


#: The entries a version 3 view adds to ``{"id", "rows", "meta"}`` (all three, or none).
_VIEW_COLUMN_KEYS = {"columns", "values", "item_key"}


def _parse_view(doc: Any, where: str, version: int) -> ViewInfo:
    doc = expect(doc, dict, where)
    if version < 3 or not _VIEW_COLUMN_KEYS & set(doc):
        run = _parse_run(doc, where, lo=0)
        return ViewInfo(run.id, run.rows, run.meta)
    only_keys(doc, {"id", "rows", "meta"} | _VIEW_COLUMN_KEYS, where)
    missing = _VIEW_COLUMN_KEYS - set(doc)
    if missing:
        raise CorruptStoreError(f"{where}: a view with columns has {sorted(_VIEW_COLUMN_KEYS)}; missing {sorted(missing)}")
    run = _parse_run({k: doc.get(k) for k in ("id", "rows", "meta")}, where, lo=0)
    cols_doc = expect(doc.get("columns"), dict, f"{where}.columns")
    columns = {check_name(k, f"{where}.columns"): Field.from_json(v, f"{where}.columns.{k}", version)
               for k, v in cols_doc.items()}
    for k, f in columns.items():
        if f.compression is not None or f.quantize is not None:
            raise CorruptStoreError(f"{where}.columns.{k}: a view column is stored raw (no compression, no quantize)")
    values = expect(doc.get("values"), dict, f"{where}.values")
    ragged = {k for k, f in columns.items() if f.ragged}
    if set(values) != ragged:
        raise CorruptStoreError(f"{where}.values: expected counts for {sorted(ragged)}, got {sorted(values)}")
    item_key = doc.get("item_key")
    if type(item_key) is not bool:
        raise CorruptStoreError(f"{where}.item_key: expected true or false, got {item_key!r:.40}")
    if not columns and not item_key:
        raise CorruptStoreError(f"{where}: a view with no columns and no item_key is written without those entries")
    return ViewInfo(run.id, run.rows, run.meta, columns,
                    {k: bounded_int(v, f"{where}.values.{k}") for k, v in values.items()}, item_key)
