"""``verify``: check every byte of a store against its checksums, and its structure.

The manifest names each segment, index run and view together with the BLAKE3 of
its ``zarr.json``; that document records the size and BLAKE3 of every file in
it.  So one pass over the files checks all data against the commit, and the
structural checks (array metadata, offsets, the key index) catch a store that
was written wrong rather than damaged.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np

from .errors import CorruptStoreError, StoreError
from .format import (
    FIELDS_DIR,
    INDEXES_DIR,
    KEY_BYTES,
    MAX_METADATA_BYTES,
    SEGMENT_ATTR,
    SEGMENTS_DIR,
    VIEWS_DIR,
    IndexRunInfo,
    Manifest,
    SegmentInfo,
    array_metadata,
    chunk_path,
    loads,
)
from .reader import Snapshot, key_prefixes, map_object_array

__all__ = ["VerifyReport", "object_files", "read_document", "verify_store"]

_HASH_THREADS_MIN = 1 << 22


@dataclass
class VerifyReport:
    """What :func:`verify_store` checked."""

    files: int = 0
    bytes: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def hash_file(path: str, size: int) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if size >= _HASH_THREADS_MIN else 1)
    if size:
        h.update_mmap(path)
    return h.hexdigest()


def _inside(base: str, rel: str) -> str:
    """``base/rel`` if it stays inside ``base`` (no '..', no absolute, no symlinks)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise CorruptStoreError(f"{base}: invalid file name {rel!r:.80} in metadata")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CorruptStoreError(f"{base}: file name {rel!r:.80} in metadata leaves its directory")
    path = os.path.join(base, *parts)
    probe = base
    for p in parts:
        probe = os.path.join(probe, p)
        if os.path.islink(probe):
            raise CorruptStoreError(f"{path}: is a symbolic link; stores never contain links")
    return path


def read_document(path: str, limit: int = MAX_METADATA_BYTES) -> bytes:
    """Read a metadata file (at most ``limit`` + 1 bytes, so that oversize is detectable).

    Refuses a symbolic link or anything but a regular file (a FIFO would block
    forever) with :class:`CorruptStoreError`; other ``OSError`` propagate.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptStoreError(f"{path}: is a symbolic link; stores never contain links (not following it)") from e
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptStoreError(f"{path}: not a regular file")
        return f.read(limit + 1)


def object_files(base: str, info_meta: str, where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Read and check an object's ``zarr.json`` against the manifest's digest.

    Returns (the object's attributes, file name → {size, blake3}).
    """
    meta_path = os.path.join(base, "zarr.json")
    try:
        data = read_document(meta_path)
    except OSError as e:
        raise CorruptStoreError(f"{meta_path}: cannot read ({e.strerror or e})") from e
    if blake3.blake3(data).hexdigest() != info_meta:
        raise CorruptStoreError(f"{meta_path}: checksum does not match the manifest ({where})")
    doc = loads(data, meta_path)
    try:
        attrs = doc["attributes"][SEGMENT_ATTR]
        files = attrs["files"]
        if not isinstance(files, dict):
            raise TypeError
        for rel, rec in files.items():
            if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("blake3"), str)):
                raise TypeError(rel)
    except (KeyError, TypeError) as e:
        raise CorruptStoreError(f"{meta_path}: malformed segment metadata ({e})") from e
    return attrs, files


def _check_files(base: str, files: dict[str, dict[str, Any]], report: VerifyReport) -> None:
    for rel, rec in sorted(files.items()):
        try:
            path = _inside(base, rel)
            size = os.stat(path).st_size
            if size != rec["size"]:
                raise CorruptStoreError(f"{path}: {size} bytes, expected {rec['size']}")
            if hash_file(path, size) != rec["blake3"]:
                raise CorruptStoreError(f"{path}: checksum mismatch (the bytes on disk changed)")
            report.files += 1
            report.bytes += size
        except FileNotFoundError:
            report.problems.append(f"{os.path.join(base, rel)}: missing")
        except (CorruptStoreError, OSError) as e:
            report.problems.append(str(e))


def array_inner_rows(path: str, rows: int, inner: tuple[int, ...], zdtype: str, codec: Any = None) -> int:
    """Rows per inner chunk from an array's ``zarr.json`` (``path``), which must be exactly
    what the writer produces for these rows."""
    doc = loads(read_document(path, 1 << 20), path)
    try:
        inner_rows = int(doc["codecs"][0]["configuration"]["chunk_shape"][0])
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:  # (JSON 1e400 parses as inf)
        raise CorruptStoreError(f"{path}: not a single-shard array ({e})") from e
    if inner_rows < 1 or doc != array_metadata(rows, inner, zdtype, inner_rows, codec=codec):
        raise CorruptStoreError(f"{path}: metadata disagrees with the manifest (expected {rows} rows of {zdtype}{list(inner)}"
                                f"{', ' + codec['name'] if codec else ''})")
    return inner_rows


def _expect_array(base: str, rel: str, rows: int, inner: tuple[int, ...], zdtype: str,
                  files: dict[str, Any], codec: Any = None) -> int:
    """The array's zarr.json must be listed and exactly what the writer produces; returns its inner rows."""
    path = os.path.join(base, rel, "zarr.json")
    if f"{rel}/zarr.json" not in files:
        raise CorruptStoreError(f"{path}: not listed in the segment metadata")
    inner_rows = array_inner_rows(path, rows, inner, zdtype, codec)
    data = f"{rel}/{chunk_path(len(inner) + 1)}"
    if rows and data not in files:
        raise CorruptStoreError(f"{os.path.join(base, data)}: not listed in the segment metadata")
    return inner_rows


def verify_store(root: str, manifest: Manifest, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every file of the committed snapshot ``manifest``.  Never raises for damage:
    problems are collected in the report (the caller decides)."""
    report = VerifyReport(rows=manifest.rows)
    for i, seg in enumerate(manifest.segments):
        base = os.path.join(root, SEGMENTS_DIR, seg.id)
        try:
            _inside(root, f"{SEGMENTS_DIR}/{seg.id}")  # no links on the way
            attrs, files = object_files(base, seg.meta, f"segments[{i}]")
            _check_segment(base, seg, attrs, files, manifest, report)
            _check_files(base, files, report)
        except (StoreError, OSError) as e:
            report.problems.append(str(e))
        if progress:
            progress(seg.rows)
    starts = np.cumsum([0] + [s.rows for s in manifest.segments])
    for directory, objs in ((INDEXES_DIR, list(manifest.indexes)), (VIEWS_DIR, list(manifest.views.values()))):
        for info in objs:
            base = os.path.join(root, directory, info.id)
            try:
                _inside(root, f"{directory}/{info.id}")
                _, files = object_files(base, info.meta, f"{directory}/{info.id}")
                names = ("prefix", "row") if directory == INDEXES_DIR else ("row",)
                for name in names:
                    _expect_array(base, name, info.rows, (), "uint64" if name == "prefix" else "int64", files)
                _check_files(base, files, report)
            except (StoreError, OSError) as e:
                report.problems.append(str(e))
    if not report.problems:
        _check_index(root, manifest, starts, report)
    return report


def _check_segment(base: str, seg: SegmentInfo, attrs: dict[str, Any], files: dict[str, Any],
                   manifest: Manifest, report: VerifyReport) -> None:
    if attrs.get("rows") != seg.rows or attrs.get("values") != dict(seg.values):
        raise CorruptStoreError(f"{base}/zarr.json: row counts disagree with the manifest")
    _expect_array(base, "keys", seg.rows, (KEY_BYTES,), "uint8", files)
    for name, f in manifest.fields.items():
        rel = f"{FIELDS_DIR}/{name}"
        if f.ragged:
            _expect_array(base, f"{rel}/values", seg.values[name], f.inner_shape, f.spec.zarr, files, f.codec)
            _expect_array(base, f"{rel}/offsets", seg.rows + 1, (), "int64", files)
        else:
            _expect_array(base, rel, seg.rows, f.inner_shape, f.spec.zarr, files, f.codec)


def _check_index(root: str, manifest: Manifest, starts: np.ndarray, report: VerifyReport) -> None:
    """Structure beyond checksums: offsets, unique keys, and an index that finds every row."""
    try:
        snap = Snapshot(root, manifest)
        for seg in snap.segments:
            for name, f in manifest.fields.items():
                if f.ragged:
                    seg.ragged(name)  # checks offsets when mapping
        n = manifest.rows
        if n:
            keys = snap.gather_keys(np.arange(n))
            prefix = np.concatenate([r.prefix for r in snap.runs])
            rows = np.concatenate([r.row for r in snap.runs])
            for r in snap.runs:
                if len(r.prefix) > 1 and not np.all(r.prefix[1:] >= r.prefix[:-1]):
                    raise CorruptStoreError(f"{root}/{INDEXES_DIR}: an index run is not sorted")
            if not np.array_equal(np.sort(rows), np.arange(n)):
                raise CorruptStoreError(f"{root}/{INDEXES_DIR}: the key index does not cover every row exactly once")
            if not np.array_equal(prefix, key_prefixes(keys[rows])):
                raise CorruptStoreError(f"{root}/{INDEXES_DIR}: the key index disagrees with the stored keys")
            if len(np.unique(keys.view(np.dtype((np.void, KEY_BYTES))).ravel())) != n:
                raise CorruptStoreError(f"{root}/{SEGMENTS_DIR}: a key is stored twice")
        for name, info in manifest.views.items():
            v = np.asarray(snap_view(root, info))
            if v.size and (v.min() < -1 or v.max() >= n):
                raise CorruptStoreError(f"{root}/{VIEWS_DIR}/{info.id}: view {name!r} names rows outside the store")
    except (StoreError, OSError) as e:
        report.problems.append(str(e))


def snap_view(root: str, info: IndexRunInfo) -> np.ndarray:
    return map_object_array(root, VIEWS_DIR, info, "row", "int64")

