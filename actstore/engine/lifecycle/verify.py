"""``verify``: check every byte of a store against its checksums, and its structure.

The manifest names each segment, index run and view together with the BLAKE3 of
its ``zarr.json``; that document records the size and BLAKE3 of every file in
it.  So one pass over the files checks all data against the commit, and the
structural checks (array metadata, offsets, the key index) catch a store that
was written wrong rather than damaged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actstore.engine.read.maps import map_object_array
from actstore.engine.read.snapshot import Snapshot, key_prefixes
from actstore.engine.read.views import ViewColumns
from actstore.errors import CorruptStoreError, StoreError
from actstore.format.layout import FIELDS_DIR, INDEXES_DIR, SEGMENTS_DIR, VIEWS_DIR, field_arrays, view_arrays
from actstore.format.manifest import KEY_BYTES, IndexRunInfo, Manifest, SegmentInfo, ViewInfo
from actstore.storage.base import Backend
from actstore.storage.checksum import hash_file
from actstore.storage.files import expect_array, inside, object_files, read_document

__all__ = ["VerifyReport", "object_files", "read_document", "verify_snapshot", "verify_store"]


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


def _check_files(base: str, files: dict[str, dict[str, Any]], report: VerifyReport) -> None:
    for rel, rec in sorted(files.items()):
        try:
            path = inside(base, rel)
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


def verify_store(root: str, manifest: Manifest, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every file of the committed snapshot ``manifest``.  Never raises for damage:
    problems are collected in the report (the caller decides)."""
    report = VerifyReport(rows=manifest.rows)
    for i, seg in enumerate(manifest.segments):
        base = os.path.join(root, SEGMENTS_DIR, seg.id)
        try:
            inside(root, f"{SEGMENTS_DIR}/{seg.id}")  # no links on the way
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
                inside(root, f"{directory}/{info.id}")
                attrs, files = object_files(base, info.meta, f"{directory}/{info.id}")
                if isinstance(info, ViewInfo):  # row, and a version 3 view's item_key and columns (FORMAT.md §8)
                    if attrs.get("rows") != info.rows or attrs.get("values", {}) != dict(info.values):
                        raise CorruptStoreError(f"{base}/zarr.json: row counts disagree with the manifest")
                    for a in view_arrays(info.columns, info.item_key):
                        expect_array(base, a.rel, a.rows(info.rows, info.values.get(a.key.split("/")[0], 0)), a.inner,
                                     a.zarr, files, a.codec)
                else:
                    for name in ("prefix", "row"):
                        expect_array(base, name, info.rows, (), "uint64" if name == "prefix" else "int64", files)
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
    expect_array(base, "keys", seg.rows, (KEY_BYTES,), "uint8", files)
    for name, f in manifest.fields.items():
        for a in field_arrays(name, f):
            expect_array(base, a.rel, a.rows(seg.rows, seg.values.get(name, 0)), a.inner, a.zarr, files, a.codec)


def _check_index(root: str, manifest: Manifest, starts: np.ndarray, report: VerifyReport) -> None:
    """Structure beyond checksums: offsets, unique keys, and an index that finds every row."""
    try:
        snap = Snapshot(root, manifest)
        for seg in snap.segments:
            for name, f in manifest.fields.items():
                if f.ragged:
                    seg.ragged(name)  # checks offsets when mapping
                if f.quantize is not None:
                    scales = seg.scales(name)
                    bad = int(np.count_nonzero(~(scales >= 0) | ~np.isfinite(scales)))  # (NaN fails both)
                    if bad:
                        raise CorruptStoreError(f"{seg.path}/{FIELDS_DIR}/{name}/scales: {bad} scales are negative, "
                                                "NaN or infinite (a quantised field's scales are finite and >= 0)")
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
            if info.has_columns:
                ViewColumns(root, name, info)  # maps every column: checks a ragged column's offsets
    except (StoreError, OSError) as e:
        report.problems.append(str(e))


def snap_view(root: str, info: IndexRunInfo) -> np.ndarray:
    return map_object_array(root, VIEWS_DIR, info, "row", "int64")



def verify_snapshot(backend: Backend, manifest: Manifest, *, progress: bool = False) -> VerifyReport:
    """:meth:`ActivationStore.verify`: check the snapshot's files as the backend has them now; raise on damage.

    On object storage every file is downloaded again first (see
    :meth:`~actstore.storage.base.Backend.fresh_files`).
    """
    from tqdm.auto import tqdm

    with tqdm(total=manifest.rows, unit="row", desc="verify", disable=not progress) as bar, \
            backend.fresh_files(manifest, bar.update) as (root, fetch_problems):
        if fetch_problems is None:  # the files are the store's own
            report: VerifyReport | None = verify_store(root, manifest, bar.update)
            problems = report.problems if report is not None else []
        else:
            report = verify_store(root, manifest) if not fetch_problems else None
            problems = fetch_problems if report is None else [p.replace(root, backend.url) for p in report.problems]
    if problems or report is None:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CorruptStoreError(f"{backend.url}: {len(problems)} problem(s):\n  {shown}{more}")
    return report
