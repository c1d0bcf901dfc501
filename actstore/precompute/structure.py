"""The items' structure, read off the first DataLoader batch: the side columns and the item record.

The first item decides the layout (bare, tuple or dict; where the input sits)
and each side column's field and kind (``side_fields=`` overrides a field or
drops a column); :mod:`actstore.precompute.items` converts every later item
accordingly.  The result is recorded in the store (``attrs["precompute"]["sample"]``)
and compared with a resumed store's (:func:`~actstore.precompute.resume.keep_or_replace`).
"""

from __future__ import annotations

from actstore.format.fields import Field
from actstore.format.record import ItemRecord
from actstore.precompute.config import PrecomputeConfig
from actstore.precompute.items import SideColumn, SideColumns, encode_side
from actstore.precompute.loader import Group, field_name

__all__ = ["item_structure"]


def item_structure(first: Group, cfg: PrecomputeConfig) -> tuple[SideColumns, ItemRecord]:
    """(the side columns, the item record) of a dataset whose first batch is ``first``.

    Raises ``ValueError`` for a side column whose field a layer takes, or for
    ``side_fields`` naming a column the items do not have.
    """
    structure = dict(first.structure or {"type": "bare"})
    overrides = cfg.items.side_fields
    layer_fields = set(cfg.capture.fields.values())
    columns: list[SideColumn] = []
    dropped = []
    for name, value in (first.sides[0] or {}).items():
        override = overrides.get(name, ...)
        if override is None:
            dropped.append(name)
            continue
        kind, spec = encode_side(name, value)
        if isinstance(override, Field):
            if override.compression is not None or override.quantize is not None:
                raise ValueError(f"side_fields[{name!r}]: side values are stored per dataset position, raw; "
                                 f"got {override} (drop compression= and quantize=)")
            spec = override
            kind = kind if kind in ("str", "bytes") and spec == Field((None,), "uint8") else "array"
        fname = field_name(f"item_{name}" if structure["type"] == "tuple" else name)
        if fname in layer_fields or fname in {c.field for c in columns}:
            raise ValueError(f"side column {name!r} would be stored as field {fname!r}, which is taken by a "
                             f"layer; drop it with side_fields={{{name!r}: None}}")
        columns.append(SideColumn(name, fname, kind, spec))
    unknown = set(overrides) - {c.name for c in columns} - set(dropped)
    if unknown:
        raise ValueError(f"side_fields names {sorted(unknown)}, which the items do not have "
                         f"(side columns: {sorted(first.sides[0] or {})})")
    structure["side"] = [c.to_json() for c in columns]
    structure["dropped"] = dropped
    return SideColumns(columns), ItemRecord.from_json(structure, "the first item")
