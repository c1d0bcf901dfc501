"""Segments and the snapshot: one committed generation of a store, read through lazily made memory maps.

Everything here reads a committed snapshot (a :class:`~actstore.format.manifest.Manifest`)
and never writes.  Maps are created lazily (:func:`~actstore.engine.read.maps.map_rows`,
the one zero-copy function), the first time a segment's array is touched, so a
process that forks (DataLoader workers) inherits nothing it has not used, and
``open`` costs the same for ten rows or a billion.  Gathers:
:mod:`actstore.engine.read.gather`.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.engine.read.base import row_class
from actstore.engine.read.compressed import CompressedRows
from actstore.engine.read.gather import take_rows
from actstore.engine.read.maps import (
    ReadCheck,
    check_no_links,
    data_file_size,
    map_object_array,
    map_rows,
    wanted_files,
)
from actstore.errors import CorruptStoreError, StoreError
from actstore.format.arrays import chunk_path
from actstore.format.dtypes import INTERNAL_DTYPES
from actstore.format.fields import Field
from actstore.format.layout import FIELDS_DIR, INDEXES_DIR, SEGMENTS_DIR, field_arrays
from actstore.format.manifest import KEY_BYTES, IndexRunInfo, Manifest, SegmentInfo
from actstore.format.record import read_record
from actstore.storage.base import FileProvider
from actstore.storage.files import array_inner_rows

if TYPE_CHECKING:
    from actstore.engine.read.plans import RowMany, RowOne

__all__ = ["IndexRun", "SegmentReader", "Snapshot", "field_aliases", "key_prefixes", "normalize_keys"]


#: ``relocate(info)``: the segment of a newer commit holding the rows of the compacted segment ``info``, and the
#: local row where they start there; None when ``info`` was not compacted away.
Relocate = Callable[[SegmentInfo], "tuple[SegmentReader, int] | None"]


class SegmentReader:
    """Lazily mapped arrays of one committed segment.

    ``provide`` (the backend's file hook, :data:`actstore.storage.base.FileProvider`)
    is called before each array is mapped, to make its files present locally.
    ``relocate`` (set by :class:`Snapshot`) finds the segment's rows after a
    compaction deleted its files before this reader mapped them: its arrays are
    then views of the rows' range in the merged segment (never copies, except a
    ragged field's offsets, rebased).  ``plans`` keeps the read plans built over
    its maps (:mod:`actstore.engine.read.plans`); :meth:`forget` drops both.
    """

    __slots__ = ("arrays", "check", "fields", "info", "path", "plans", "provide", "relocate")

    def __init__(self, root: str, info: SegmentInfo, fields: dict[str, Field], check: ReadCheck | None = None,
                 provide: FileProvider | None = None, relocate: Relocate | None = None,
                 directory: str = SEGMENTS_DIR) -> None:
        # ``directory``: VIEWS_DIR for a view's columns, laid out as a segment's fields (FORMAT.md §8)
        self.path = os.path.join(root, directory, info.id)
        self.info = info
        self.fields = fields
        self.arrays: dict[str, np.ndarray] = {}
        self.plans: dict[Any, Any] = {}
        self.check = check
        self.provide = provide
        self.relocate = relocate

    def forget(self, names: Sequence[str]) -> None:
        """Drop this reader's maps of the arrays ``names`` (and every plan built over its maps); views keep theirs."""
        self.plans.clear()
        for name in names:
            self.arrays.pop(name, None)

    def _moved(self, error: Exception) -> tuple[SegmentReader, int]:
        """Where this segment's rows are now (after a compaction), or raise ``error`` (the files are just missing)."""
        try:
            found = self.relocate(self.info) if self.relocate is not None else None
        except (StoreError, OSError):  # no readable newer manifest (the store was deleted, say): report the files
            found = None
        if found is None:
            raise error
        return found

    def _map(self, rel: str, rows: int, inner: tuple[int, ...], dtype: np.dtype[Any], codec: Any = None) -> Any:
        """The array ``rel``: a map (never copies), or :class:`CompressedRows` for a compressed field."""
        path = os.path.join(self.path, rel, *chunk_path(len(inner) + 1).split("/"))
        check_no_links(os.path.dirname(os.path.dirname(self.path)), path)
        if self.provide is not None:
            self.provide(self.path, self.info.meta, wanted_files(rel, rows, inner, codec, self.check))
        if self.check is not None:
            self.check(self.path, self.info.meta, rel, rows, inner, dtype, codec)
        if codec is None or rows == 0:
            return map_rows(path, rows, inner, dtype)
        inner_rows = array_inner_rows(os.path.join(self.path, rel, "zarr.json"), rows, inner, dtype.name, codec)
        return CompressedRows(path, rows, inner, dtype, inner_rows, data_file_size(path))

    def keys(self) -> np.ndarray:
        a = self.arrays.get("keys")
        if a is None:
            try:
                a = self._map("keys", self.info.rows, (KEY_BYTES,), INTERNAL_DTYPES["uint8"])
            except CorruptStoreError as e:
                seg, at = self._moved(e)
                a = seg.keys()[at : at + self.info.rows]
            self.arrays["keys"] = a
        return a

    def fixed(self, name: str) -> np.ndarray:
        """A fixed field's stored rows (a quantised field's codes: see :meth:`scales`)."""
        a = self.arrays.get(name)
        if a is None:
            f = self.fields[name]
            spec = field_arrays(name, f)[0]
            try:
                a = self._map(spec.rel, self.info.rows, f.inner_shape, spec.numpy, f.codec)
            except CorruptStoreError as e:
                seg, at = self._moved(e)
                a = _rows_of(seg.fixed(name), at, at + self.info.rows, self.path, e)
            self.arrays[name] = a
        return a

    def scales(self, name: str) -> np.ndarray:
        """A quantised field's float32 scales: one per row, or per stored element of a ragged field."""
        key = name + "/scales"
        a = self.arrays.get(key)
        if a is None:
            f = self.fields[name]
            spec = field_arrays(name, f)[-1]
            if spec.key != key:
                raise KeyError(f"field {name!r} is not quantised: it has no scales")
            n = spec.rows(self.info.rows, self.info.values.get(name, 0))
            try:
                a = self._map(spec.rel, n, (), spec.numpy)
            except CorruptStoreError as e:
                seg, at = self._moved(e)
                if f.ragged:
                    moved = seg.ragged(name)[1]
                    lo, hi = int(moved[at]), int(moved[at + self.info.rows])
                else:
                    lo, hi = at, at + self.info.rows
                a = _rows_of(seg.scales(name), lo, hi, self.path, e)
            self.arrays[key] = a
        return a

    def ragged(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets) of a ragged field; offsets are checked once, when mapped."""
        v = self.arrays.get(name)
        if v is None:
            f = self.fields[name]
            count = self.info.values[name]
            try:
                offsets = self._map(f"{FIELDS_DIR}/{name}/offsets", self.info.rows + 1, (), INTERNAL_DTYPES["int64"])
            except CorruptStoreError as e:
                v, self.arrays[name + "/offsets"] = self._moved_ragged(name, count, e)
                self.arrays[name] = v
                return v, self.arrays[name + "/offsets"]
            if offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0):
                raise CorruptStoreError(
                    f"{self.path}/{FIELDS_DIR}/{name}/offsets: offsets are not non-decreasing from 0 to {count}"
                )
            self.arrays[name + "/offsets"] = offsets
            try:
                v = self._map(f"{FIELDS_DIR}/{name}/values", count, f.inner_shape, f.stored.numpy, f.codec)
            except CorruptStoreError as e:  # a compaction deleted the files between the two maps
                v = self._moved_ragged(name, count, e)[0]
            self.arrays[name] = v
        return v, self.arrays[name + "/offsets"]

    def _moved_ragged(self, name: str, count: int, error: Exception) -> tuple[np.ndarray, np.ndarray]:
        """This segment's (values, offsets) of ragged field ``name`` read from the segment that holds its rows now."""
        seg, at = self._moved(error)
        values, moved = seg.ragged(name)
        part = moved[at : at + self.info.rows + 1]
        base, end = int(part[0]), int(part[-1])
        if end - base != count:
            raise CorruptStoreError(f"{self.path}: its rows in segment {seg.info.id} hold {end - base} values "
                                    f"of {name!r}, not {count}") from error
        return _rows_of(values, base, end, self.path, error), part - base


def _rows_of(array: Any, start: int, stop: int, where: str, error: Exception) -> np.ndarray:
    """Rows ``start .. stop-1`` of a relocated segment's array: a view of its map."""
    if not isinstance(array, np.ndarray):  # a compressed array has no cheap view of a row range
        raise StoreError(f"{where}: this commit's segment was merged by a compaction; call refresh() on the store "
                         "(or open it again) to read the newer commit") from error
    return array[start:stop]


class IndexRun:
    """A sorted key-index run: key prefixes (uint64, ascending) and global rows."""

    __slots__ = ("prefix", "row")

    def __init__(self, root: str, info: IndexRunInfo, check: ReadCheck | None = None,
                 provide: FileProvider | None = None) -> None:
        self.prefix = map_object_array(root, INDEXES_DIR, info, "prefix", "uint64", check, provide)
        self.row = map_object_array(root, INDEXES_DIR, info, "row", "int64", check, provide)


def key_prefixes(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key as a native uint64 that sorts like the bytes."""
    # (the whole rows viewed as big-endian words, then column 0: 10× faster than copying the 8-byte column first)
    return np.ascontiguousarray(keys).view(">u8")[:, 0].astype(np.uint64)


class Snapshot:
    """One committed generation of a store, read through memory maps."""

    def __init__(self, root: str, manifest: Manifest, check: ReadCheck | None = None,
                 provide: FileProvider | None = None, latest: Callable[[], Manifest] | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.fields = dict(manifest.fields)
        self.check, self.provide, self.latest = check, provide, latest
        self.starts = np.cumsum([0] + [s.rows for s in manifest.segments], dtype=np.int64)
        self.starts_list: list[int] = self.starts.tolist()
        self.segments = [SegmentReader(root, s, self.fields, check, provide, partial(self.relocate, start))
                         for s, start in zip(manifest.segments, self.starts_list, strict=False)]
        self._moved: dict[str, SegmentReader] = {}
        self.rows = int(self.starts[-1])
        # Index runs are few (merged by the writer) and mapped now: a writer may
        # delete a superseded run later, and a map survives that.
        self.runs = [IndexRun(root, r, check, provide) for r in manifest.indexes]
        self._shared: dict[int, dict[bytes, int]] = {}
        self.aliases = field_aliases(manifest)
        #: The class of the rows the fast paths of ``store[i]`` build: ``dict``, or a ``Row`` carrying :attr:`aliases`.
        self.row_type: type[dict] = row_class(self.aliases)  # type: ignore[type-arg]
        self.plans: dict[Any, Any] = {}  # read plans over the segments' maps (engine/read/plans.py)
        #: ``store[i]``'s fast paths when they apply (:func:`actstore.engine.read.plans.row_one` for one
        #: segment, :func:`~actstore.engine.read.plans.row_many` for several; set by the store once built),
        #: dropped with the maps; None: not built, or not applicable.
        self.row1: RowOne | None = None
        self.rowk: RowMany | None = None

    def forget(self, segment: str, names: Sequence[str]) -> None:
        """Drop the maps of arrays ``names`` of segment ``segment`` (an id) and every plan over them; views keep theirs."""
        self.plans.clear()
        self.row1 = self.rowk = None
        for seg in self.segments:
            if seg.info.id == segment:
                seg.forget(names)

    def relocate(self, start: int, info: SegmentInfo) -> tuple[SegmentReader, int] | None:
        """The segment of the newest commit that holds segment ``info``'s rows (global ``start ..``), or None.

        A compaction replaces a range of segments by one segment holding the
        same rows in the same order and deletes the old files after its commit:
        a reader of an older commit that had not mapped them reads the same
        rows from the merged segment.  None (the caller reports the missing
        files) when there is no newer manifest, when it belongs to another
        store (another creation time or fields), renumbered rows (a compaction
        that dropped rows) or still names ``info``.
        """
        if self.latest is None:
            return None
        newest = self.latest()
        if (newest.created != self.manifest.created or newest.fields != self.manifest.fields
                or newest.renumbered != self.manifest.renumbered  # rows dropped since: other row numbers
                or newest.generation < self.manifest.generation or newest.rows < self.rows
                or any(s.id == info.id for s in newest.segments)):
            return None
        ends = np.cumsum([s.rows for s in newest.segments], dtype=np.int64).tolist()
        j = bisect_right(ends, start)
        if j >= len(ends) or ends[j] < start + info.rows:
            return None
        first = ends[j] - newest.segments[j].rows
        seg = self._moved.get(newest.segments[j].id)
        if seg is None:  # (its own relocate: a later compaction may merge it too before it is mapped)
            seg = SegmentReader(self.root, newest.segments[j], self.fields, self.check, self.provide,
                                partial(self.relocate, first))
        # The rows must be this snapshot's: their keys' prefixes must be the ones its key index lists for them.
        keys = seg.keys()[start - first : start - first + info.rows]
        for run in self.runs:
            mine = (run.row >= start) & (run.row < start + info.rows)
            if not np.array_equal(key_prefixes(keys[run.row[mine] - start]), run.prefix[mine]):
                return None
        self._moved[newest.segments[j].id] = seg
        return seg, start - first

    # -- rows -----------------------------------------------------------------
    def locate(self, row: int) -> tuple[SegmentReader, int]:
        asked = row
        if row < 0:
            row += self.rows
        if not 0 <= row < self.rows:
            raise IndexError(f"row {asked} is out of range for a store of {self.rows} rows")
        s = bisect_right(self.starts_list, row) - 1
        return self.segments[s], row - self.starts_list[s]

    def check_rows(self, rows: object) -> np.ndarray:
        """``rows`` (a row number or a 1-D sequence of them) as non-negative int64 rows, or the error naming one."""
        idx = np.asarray(rows)
        if idx.ndim > 1:
            raise ValueError(f"rows: expected a row number or a 1-D sequence of them, got an array of shape "
                             f"{idx.shape} (flatten it if a flat batch is meant)")
        if idx.dtype.kind not in "iu":
            if idx.size == 0:
                return np.empty(0, np.int64)
            raise TypeError(f"rows: expected integer row numbers, got an array of {idx.dtype}")
        if idx.dtype == np.uint64 and idx.size and int(idx.max()) >= self.rows:  # (would wrap to negative int64)
            raise IndexError(f"row {int(idx.max())} is out of range for a store of {self.rows} rows")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if not idx.size:
            return idx
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -self.rows or hi >= self.rows:
            bad = idx[(idx < -self.rows) | (idx >= self.rows)][0]
            raise IndexError(f"row {bad} is out of range for a store of {self.rows} rows")
        return np.where(idx < 0, idx + self.rows, idx) if lo < 0 else idx

    def gather_keys(self, rows: np.ndarray) -> np.ndarray:
        """The keys of ``rows`` (checked) as an (n, 32) uint8 array.  Always copies, once."""
        out = np.empty((len(rows), KEY_BYTES), np.uint8)
        take_rows(self, SegmentReader.keys, rows, out, row_bytes=KEY_BYTES)
        return out

    # -- keys -----------------------------------------------------------------
    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, or -1.  ``keys`` is an (n, 32) uint8 array.

        Queries are sorted once so that each run is searched in order (binary
        search with sorted needles is several times faster); a prefix match is
        confirmed against the full stored key.
        """
        out = np.full(len(keys), -1, np.int64)
        if not len(keys) or not self.runs:
            return out
        prefix = key_prefixes(keys)
        qorder = np.argsort(prefix)
        skeys = keys[qorder]
        prefix = prefix[qorder]
        found = np.full(len(keys), -1, np.int64)
        for k, run in enumerate(self.runs):
            n = len(run.prefix)
            pos = np.searchsorted(run.prefix, prefix)
            posc = np.minimum(pos, n - 1)
            cand = np.nonzero((pos < n) & (run.prefix[posc] == prefix) & (found < 0))[0]
            if not len(cand):
                continue
            rows = self._index_rows(run.row[posc[cand]])
            match = (self.gather_keys(rows).view("<u8") == skeys[cand].view("<u8")).all(axis=1)
            found[cand[match]] = rows[match]
            if not match.all():  # keys that share 8 bytes with another key of the run
                shared = self._shared_prefix_rows(k, run)
                for i in cand[~match].tolist():
                    found[i] = shared.get(bytes(skeys[i]), -1)
        out[qorder] = found
        return out

    def _shared_prefix_rows(self, k: int, run: IndexRun) -> dict[bytes, int]:
        """Full key → row for the entries of run ``k`` whose 8-byte prefix is not unique in it.

        Content keys (BLAKE3) practically never share a prefix; keys that do
        (zero-padded ids as keys, say) are looked up here instead of by a scan
        along equal prefixes, which was quadratic.  Built once per run and snapshot.
        """
        cached = self._shared.get(k)
        if cached is None:
            dup = np.flatnonzero(run.prefix[1:] == run.prefix[:-1])
            idx = np.unique(np.concatenate([dup, dup + 1]))
            rows = self._index_rows(run.row[idx]) if len(idx) else np.empty(0, np.int64)
            keys = self.gather_keys(rows)
            cached = self._shared[k] = {bytes(key): int(r) for key, r in zip(keys, rows.tolist(), strict=True)}
        return cached

    def _index_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows read from the key index, checked to lie in the store (a damaged index must not read elsewhere)."""
        if rows.min() < 0 or rows.max() >= self.rows:
            raise CorruptStoreError(f"{self.root}/{INDEXES_DIR}: the key index names rows outside [0, {self.rows}); "
                                    "the store is damaged (run verify())")
        return rows


def field_aliases(manifest: Manifest) -> dict[str, str]:
    """Other names of fields: a captured layer's module name → its field, where they differ (the precompute record).

    A record that does not parse gives no aliases here; readers of the record
    (``CachedDataset``, a resumed precompute) report it.
    """
    try:
        rec = read_record(manifest.attrs)
    except StoreError:
        return {}
    if rec is None:
        return {}
    return {d.layer: d.field for d in rec.layers if d.layer != d.field and d.layer not in manifest.fields
            and d.field in manifest.fields}


def normalize_keys(keys: object) -> np.ndarray:
    """Keys as an (n, 32) uint8 array from bytes, a sequence of bytes, or an array."""
    if isinstance(keys, (bytes, bytearray, memoryview)):
        keys = [bytes(keys)]
    if isinstance(keys, torch.Tensor):
        keys = keys.detach().cpu().numpy()
    if isinstance(keys, np.ndarray):
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
            raise ValueError(f"keys: expected an (n, {KEY_BYTES}) uint8 array, got {keys.shape} {keys.dtype}")
        return np.ascontiguousarray(keys)
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(
            f"keys: expected a sequence of {KEY_BYTES}-byte keys (bytes) or an (n, {KEY_BYTES}) uint8 array, "
            f"got {type(keys).__name__}; make keys with actstore.key(sample)"
        )
    buf = bytearray()
    for i, k in enumerate(keys):
        if not isinstance(k, (bytes, bytearray, memoryview)):
            raise TypeError(f"keys[{i}]: expected bytes, got {type(k).__name__}; make keys with actstore.key(sample)")
        if len(k) != KEY_BYTES:
            raise ValueError(f"keys[{i}]: expected {KEY_BYTES} bytes, got {len(k)}")
        buf += k
    return np.frombuffer(bytes(buf), np.uint8).reshape(-1, KEY_BYTES)
