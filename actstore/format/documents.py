"""Metadata documents: bounded JSON in and out, and the strict checks every parser in format/ is built from.

Every check raises :class:`~actstore.errors.CorruptStoreError` with a ``where`` path naming the entry (or
:class:`~actstore.errors.UnsupportedFormatError` for a name this reader does not know) — never another exception.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from actstore.errors import CorruptStoreError, UnsupportedFormatError

__all__ = ["MAX_METADATA_BYTES", "bounded_int", "check_id", "check_name", "dumps", "expect", "hex64", "loads",
           "name_argument", "named_entry", "only_keys"]

#: Metadata documents larger than this are refused before parsing.
MAX_METADATA_BYTES = 64 * 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def dumps(doc: object) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")


def loads(data: bytes, where: str) -> Any:
    """Parse a metadata document, bounded in size and without NaN/Infinity."""
    if len(data) > MAX_METADATA_BYTES:
        raise CorruptStoreError(f"{where}: {len(data)} bytes is larger than the {MAX_METADATA_BYTES}-byte limit")

    def no_constants(name: str) -> None:
        raise CorruptStoreError(f"{where}: invalid JSON constant {name}")

    def finite(text: str) -> float:  # 1e400 would parse as inf
        value = float(text)
        if not math.isfinite(value):
            raise CorruptStoreError(f"{where}: number {text[:40]} is out of range")
        return value

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants, parse_float=finite)
    except CorruptStoreError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStoreError(f"{where}: not valid JSON ({e})") from e


def check_name(name: object, where: str) -> str:
    """A field name: letters, digits, ``_ . -``; no path separators, no leading dot.

    ``zarr.json`` (any case) would collide with the group document beside the
    field's directory, and Zarr v3 reserves names starting with ``__``.
    """
    if (not isinstance(name, str) or not _NAME_RE.match(name) or name.lower() == "zarr.json"
            or name.startswith("__")):
        raise CorruptStoreError(
            f"{where}: invalid name {name!r}; names use letters, digits, '_', '.', '-' "
            "(at most 128, not starting with '.', '-' or '__', and not 'zarr.json')"
        )
    return name


def name_argument(name: object, where: str) -> str:
    """:func:`check_name` for a name a caller passed (not one read from a store): raises ``ValueError``."""
    try:
        return check_name(name, where)
    except CorruptStoreError as e:
        raise ValueError(str(e)) from None


def check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise CorruptStoreError(f"{where}: expected 32 lowercase hex digits, got {value!r:.80}")
    return value


def hex64(value: object, where: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.match(value):
        raise CorruptStoreError(f"{where}: expected a 64-digit hex BLAKE3 digest, got {value!r:.80}")
    return value


def bounded_int(value: object, where: str, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CorruptStoreError(f"{where}: expected an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise CorruptStoreError(f"{where}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def only_keys(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise CorruptStoreError(f"{where}: unknown entries {sorted(unknown)}")


def named_entry(doc: Mapping[str, Any], key: str, keys: set[str], supported: Collection[str], what: str,
                 where: str) -> tuple[dict[str, Any], str]:
    """A field's ``{"name": ..., ...}`` entry ``doc[key]`` and its name, which must be one this reader supports."""
    entry = expect(doc[key], dict, f"{where}.{key}")
    only_keys(entry, keys, f"{where}.{key}")
    name = expect(entry.get("name"), str, f"{where}.{key}.name")
    if name not in supported:
        raise UnsupportedFormatError(f"{where}.{key}: {what} {name[:40]!r} is not supported by this version of "
                                     f"actstore (it reads {list(supported)}); upgrade actstore")
    return entry, name
