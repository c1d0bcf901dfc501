"""ActivationStore: create, open, look up and read an activation store."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from actstore.engine.gather import Row, check_float_dtype, gather_fixed, gather_padded, gather_ragged, row_view
from actstore.engine.ragged import PaddedBatch, RaggedBatch
from actstore.engine.reader import (
    ReadCheck,
    SegmentReader,
    Snapshot,
    key_prefixes,
    map_object_array,
    normalize_keys,
)
from actstore.engine.validate import validate_batch
from actstore.engine.verify import VerifyReport, read_document, verify_store
from actstore.engine.writer import (
    MAX_INDEX_RUNS,
    SegmentWriter,
    StoreLock,
    next_manifest,
    remove_unreferenced,
    write_index_run,
    write_manifest,
    write_object,
)
from actstore.errors import CorruptStoreError, StaleStoreError, StoreError, StoreExistsError, StoreNotFoundError
from actstore.format.codecs import MAX_INNER_CHUNK_BYTES
from actstore.format.manifest import (
    FORMAT_VERSION,
    INDEXES_DIR,
    LOCK_DIR,
    PARTS_DIR,
    SEGMENTS_DIR,
    VIEWS_DIR,
    Field,
    Manifest,
    check_name,
    group_document,
    parse_manifest,
    parse_root,
)
from actstore.storage import files as fsio
from actstore.storage.objects import is_url, local_path

__all__ = ["ActivationStore", "create", "open"]

log = logging.getLogger("actstore")

#: Default bytes per inner chunk (what a generic Zarr reader fetches at a time).
DEFAULT_CHUNK_BYTES = 1 << 20


def _fspath(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(local_path(os.fspath(path)))


def read_manifest(root: str) -> Manifest:
    doc = os.path.join(root, "zarr.json")
    try:
        data = read_document(doc)  # a regular file, not a link (never blocks on a FIFO), bounded in size
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"{root}: no store here (no zarr.json); create one with actstore.create()") from e
    return parse_root(data, doc)


def create(
    path: str | os.PathLike[str],
    fields: Mapping[str, Field],
    *,
    fingerprint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    exist_ok: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Create an empty store and open it for appending.

    Parameters
    ----------
    path
        A directory that does not exist yet, or an empty one.
    fields
        Field name → :class:`Field`.  Names use letters, digits, ``_ . -``.
    fingerprint
        The frozen model's :func:`actstore.fingerprint`, checked by readers that
        pass ``fingerprint=`` to :func:`open`.
    attrs
        JSON-serialisable metadata kept with the store.
    chunk_bytes
        Size of the inner chunks other Zarr readers fetch; actstore itself maps
        whole shards and does not care.
    exist_ok
        Open an existing store with the same fields instead of raising.
    cache_dir, cache_bytes, storage_options
        For a URL (``s3://bucket/prefix`` or any fsspec URL) only: see
        :func:`actstore.remote.open_remote`.  Ignored for local paths.

    Raises
    ------
    StoreExistsError
        The path holds a store or other files (unless ``exist_ok`` and the store's
        fields match).

    Examples
    --------
    >>> import actstore, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with actstore.create(d + "/s", {"h": actstore.Field((4,), "float16")}) as s:
    ...     s.append([actstore.key("a")], {"h": [[1, 2, 3, 4]]})
    1
    >>> len(actstore.open(d + "/s"))
    1
    """
    if is_url(path):
        from actstore.remote import create_remote

        return create_remote(str(path), fields, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk_bytes,
                             exist_ok=exist_ok, cache_dir=cache_dir, cache_bytes=cache_bytes,
                             storage_options=storage_options)
    root = _fspath(path)
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError("fields: expected a non-empty dict of name -> actstore.Field")
    checked: dict[str, Field] = {}
    for name, f in fields.items():
        try:
            check_name(name, "fields")
        except StoreError as e:
            raise ValueError(str(e)) from None
        if not isinstance(f, Field):
            raise TypeError(f"fields[{name!r}]: expected an actstore.Field, got {type(f).__name__}")
        checked[name] = f
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")
    for name, f in checked.items():
        if f.compression is not None and max(f.row_bytes, min(chunk_bytes, 1 << 62)) > MAX_INNER_CHUNK_BYTES:
            raise ValueError(f"fields[{name!r}]: a compressed field's inner chunks (chunk_bytes, or one row of "
                             f"{f.row_bytes:,} bytes) may hold at most {MAX_INNER_CHUNK_BYTES:,} bytes")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint: expected a str (actstore.fingerprint(model)) or None, got {type(fingerprint).__name__}")
    try:
        json.dumps(dict(attrs or {}), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"attrs: must be JSON-serialisable ({e})") from e
    if os.path.exists(os.path.join(root, "zarr.json")):
        if not exist_ok:
            raise StoreExistsError(f"{root}: a store already exists; open it with actstore.open(path, mode='a')")
        store = open(root, mode="a", fingerprint=fingerprint)
        if dict(store.fields) != checked:
            store.close()
            raise StoreExistsError(
                f"{root}: a store with other fields exists ({_describe(store.fields)}; wanted {_describe(checked)})"
            )
        return store
    if os.path.exists(root) and (not os.path.isdir(root) or set(os.listdir(root)) - {SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR,
                                                                                      LOCK_DIR, PARTS_DIR}):
        raise StoreExistsError(f"{root}: exists and is not an empty directory")
    os.makedirs(root, exist_ok=True)
    lock = StoreLock(root)
    if os.path.exists(os.path.join(root, "zarr.json")):
        # Another process created the store between the check above and taking the
        # lock: never overwrite its manifest (that would orphan its commits).
        lock.release()
        return create(root, checked, fingerprint=fingerprint, attrs=attrs, chunk_bytes=chunk_bytes, exist_ok=exist_ok)
    try:
        for sub in (SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
            fsio.write_durable(os.path.join(root, sub, "zarr.json"), group_document())
            fsio.fsync_dir(os.path.join(root, sub))
        fsio.fsync_dir(root)
        fsio.fsync_dir(os.path.dirname(root))
        manifest = Manifest(
            fields=checked,
            fingerprint=fingerprint,
            attrs=dict(attrs or {}),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            chunk_bytes=chunk_bytes,
        )
        write_manifest(root, manifest)
    except BaseException:
        lock.release()
        raise
    return ActivationStore(root, manifest, mode="a", lock=lock)


def open(  # noqa: A001 - mirrors zarr.open / builtins.open on purpose
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    fingerprint: str | None = None,
    verify_reads: bool = False,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_bytes: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Open a store.

    Parameters
    ----------
    path
        The store's directory, or a URL (``s3://bucket/prefix`` or any fsspec
        URL): the store is then read through a local chunk cache and written
        through a local staging store (see :mod:`actstore.remote`).
    mode
        ``"r"`` to read a snapshot of the last commit, ``"a"`` to append (takes the
        writer lock and deletes files left by writers that crashed before
        committing).
    fingerprint
        If given, the store must have been computed by a model with this
        :func:`actstore.fingerprint`.
    verify_reads
        Check every file against its commit's BLAKE3 the first time this handle
        maps it (one extra read of each file used): damaged bytes then raise
        :class:`CorruptStoreError` instead of being returned.  Off by default.
    cache_dir, cache_bytes, storage_options
        URLs only (ignored for local paths): the chunk cache directory (``None``:
        ``~/.cache/actstore/...``; ``False``: none, read through zarr-python),
        its size limit in bytes, and options for the fsspec filesystem
        (credentials, endpoint); see :func:`actstore.remote.open_remote`.

    Raises
    ------
    StoreNotFoundError, CorruptStoreError, UnsupportedFormatError, StaleStoreError, StoreLockedError

    Opening reads one small document and maps a few index files: its cost does
    not grow with the number of rows.
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode: expected 'r' or 'a', got {mode!r}")
    if is_url(path):
        from actstore.remote import open_remote

        return open_remote(str(path), mode, fingerprint=fingerprint, verify_reads=verify_reads, cache_dir=cache_dir,
                           cache_bytes=cache_bytes, storage_options=storage_options)
    root = _fspath(path)
    if not os.path.isdir(root):
        raise StoreNotFoundError(f"{root}: no store here (not a directory)")
    lock = StoreLock(root) if mode == "a" else None
    try:
        manifest = read_manifest(root)
        _check_fingerprint(root, manifest, fingerprint)
        if lock is not None:
            removed = remove_unreferenced(root, manifest)
            if removed:
                log.info("%s: removed %d uncommitted leftovers of an interrupted writer", root, len(removed))
        return ActivationStore(root, manifest, mode=mode, lock=lock, verify_reads=verify_reads)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _check_fingerprint(root: str, manifest: Manifest, want: str | None) -> None:
    if want is not None and manifest.fingerprint != want:
        raise StaleStoreError(
            f"{root}: the store was computed by model {manifest.fingerprint!r:.20}…, not by the given model "
            f"{want!r:.20}…; recompute it into a new path, or delete the store to overwrite it"
        )


def _describe(fields: Mapping[str, Field]) -> str:
    return ", ".join(f"{n}: {f.dtype}{list(f.shape)}" for n, f in fields.items())


class ActivationStore:
    """An activation store: rows of named fields, one row per distinct sample key.

    Obtain one with :func:`actstore.create` or :func:`actstore.open`.  A store
    opened for reading shows the snapshot of the last commit before it was
    opened (call :meth:`refresh` to see newer ones); a store opened with
    ``mode="a"`` also takes :meth:`append` and :meth:`commit`.

    Reads return ``torch.Tensor`` views of private copy-on-write memory maps:
    no copy is made, PyTorch sees a writable tensor, and writes to it never
    reach the file (see :func:`actstore.engine.reader.map_rows` for the lifetime rules).
    """

    def __init__(self, root: str, manifest: Manifest, *, mode: str, lock: StoreLock | None = None,
                 verify_reads: bool = False) -> None:
        self.path = root
        self.mode = mode
        self._lock = lock
        self._check = ReadCheck() if verify_reads else None
        self._load(manifest)
        self._segment: SegmentWriter | None = None
        self._pending_views: dict[str, np.ndarray] = {}
        self._closed = False

    def _load(self, manifest: Manifest) -> None:
        """Make ``manifest`` this handle's snapshot: map its index runs and views now.

        A writer deletes the index runs and views that its commit superseded, so a
        reader whose manifest was replaced just before it mapped them finds them
        gone: it then reads the manifest again and retries with the newer commit.
        """
        for _ in range(100):
            try:
                snap = Snapshot(self.path, manifest, self._check)
                views = self._map_views(manifest)
            except CorruptStoreError:
                newer = None if self.mode == "a" else read_manifest(self.path)
                if newer is None or _ids(newer) == _ids(manifest):
                    raise
                manifest = newer
                continue
            self._snap, self._views = snap, views
            return
        raise StoreError(f"{self.path}: the manifest changed 100 times while being opened; try again")

    # -- metadata -----------------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The committed snapshot this handle reads: for the read path's own layers (gathers, samplers).

        Internal but public: :mod:`actstore.training` and :mod:`actstore.precompute`
        read rows through it with :mod:`actstore.engine.gather`.  It changes on
        :meth:`refresh` and :meth:`commit`; hold the store, not the snapshot.
        """
        self._check_open()
        return self._snap

    @property
    def manifest(self) -> Manifest:
        return self._snap.manifest

    @property
    def fields(self) -> Mapping[str, Field]:
        return self._snap.manifest.fields

    @property
    def fingerprint(self) -> str | None:
        return self._snap.manifest.fingerprint

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self._snap.manifest.attrs

    @property
    def generation(self) -> int:
        """Number of commits so far; grows by one with each commit."""
        return self._snap.manifest.generation

    def __len__(self) -> int:
        """Committed rows (pending rows of a writer are not counted)."""
        return self._snap.rows

    @property
    def pending(self) -> int:
        """Rows appended but not yet committed."""
        return self._segment.rows if self._segment is not None else 0

    def __repr__(self) -> str:
        return f"ActivationStore({self.path!r}, mode={self.mode!r}, rows={len(self)}, fields={{{_describe(self.fields)}}})"

    def refresh(self) -> bool:
        """Re-read the manifest; True if a newer commit became visible."""
        self._check_open()
        manifest = read_manifest(self.path)
        if manifest.generation == self.generation:
            return False
        self._load(manifest)
        return True

    # -- keys ---------------------------------------------------------------------
    def lookup(self, keys: object) -> np.ndarray:
        """Row of each key (int64), or -1 for keys not in the last commit."""
        self._check_open()
        return self._snap.lookup(normalize_keys(keys))

    def __contains__(self, key: object) -> bool:
        return bool(self.lookup(key)[0] >= 0) if isinstance(key, (bytes, bytearray, memoryview)) else False

    def key_at(self, rows: object) -> np.ndarray:
        """The keys of ``rows`` as an (n, 32) uint8 array.  Always copies."""
        self._check_open()
        return self._snap.gather_keys(self._snap.check_rows(rows))

    # -- rows ---------------------------------------------------------------------
    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        """One row as ``{field: tensor}``.  Never copies: the tensors are views of the maps
        (except compressed fields, which are decoded into a private copy)."""
        self._check_open()
        if not isinstance(row, (int, np.integer)) or isinstance(row, bool):
            raise TypeError(f"row: expected an int, got {type(row).__name__}; use gather() for many rows")
        seg, local = self._snap.locate(int(row))
        return self._row(seg, local)

    def _row(self, seg: SegmentReader, local: int) -> dict[str, torch.Tensor]:
        return Row({name: row_view(seg, local, name, f) for name, f in self.fields.items()}, self._snap.aliases)

    def get(self, key: bytes) -> dict[str, torch.Tensor]:
        """The row stored under ``key``, as ``store[row]`` (views).  Raises ``KeyError`` if absent."""
        row = int(self.lookup(key)[0])
        if row < 0:
            raise KeyError(f"key {bytes(key).hex()[:16]}… is not in the store")
        return self[row]

    def gather(self, rows: object, fields: str | list[str] | None = None, *,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | RaggedBatch]:
        """Many rows at once: one batch tensor per fixed field, a :class:`RaggedBatch` per ragged one.

        Always copies, once per row (into a new batch tensor).  ``dtype`` casts
        floating fields on the way (for example ``torch.float32`` for a head
        that trains in float32; a cast of a fixed field still copies each row
        once); integer and bool fields keep their dtype.  For a ragged field as
        a padded batch with its mask, see :meth:`gather_padded`.
        """
        self._check_open()
        check_float_dtype(dtype)
        idx = self._snap.check_rows(rows)
        out: dict[str, torch.Tensor | RaggedBatch] = {}
        for name in self._field_names(fields):
            f = self.fields[name]
            if f.ragged:
                rb = gather_ragged(self._snap, name, f, idx)
                if dtype is not None and rb.values.is_floating_point() and rb.values.dtype != dtype:
                    rb = RaggedBatch(rb.values.to(dtype), rb.offsets)
                out[name] = rb
            else:
                out[name] = gather_fixed(self._snap, name, f, idx, dtype=dtype)
        return out

    def gather_padded(self, rows: object, field: str, *, dtype: torch.dtype | None = None,
                      pad_to_multiple_of: int | None = None, pad_value: float = 0) -> PaddedBatch:
        """A ragged field's rows as a right-padded batch: ``(values, mask, lengths)``.

        ``values`` is ``(n, L, *inner)`` with ``L`` the longest row (rounded up to
        ``pad_to_multiple_of``), ``mask`` ``(n, L)`` bool, ``lengths`` ``(n,)``.
        Every row is copied once, from the map straight into its slot (cast to
        ``dtype`` on the way for floating fields); only the padding is filled.
        """
        self._check_open()
        check_float_dtype(dtype)
        name = self._field_names(field)[0]
        f = self.fields[name]
        if not f.ragged:
            raise ValueError(f"gather_padded: field {name!r} is not ragged (shape {f.shape}); use gather()")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected a positive int or None, got {pad_to_multiple_of!r}")
        return gather_padded(self._snap, name, f, self._snap.check_rows(rows), dtype=dtype,
                             pad_to_multiple_of=pad_to_multiple_of, pad_value=pad_value)

    def _field_names(self, fields: str | list[str] | None) -> list[str]:
        """The named fields (all when None), checked: KeyError listing the store's fields."""
        if fields is None:
            return list(self.fields)
        if isinstance(fields, str):
            fields = [fields]
        unknown = [n for n in fields if n not in self.fields]
        if unknown:
            raise KeyError(f"fields {unknown} are not in the store {self.path}; it has {sorted(self.fields)}")
        return list(fields)

    def iter_rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every row in order, as ``store[row]`` gives them (views)."""
        self._check_open()
        for seg in self._snap.segments:
            for local in range(seg.info.rows):
                yield self._row(seg, local)

    # -- integrity -------------------------------------------------------------------
    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Check every byte of the snapshot against its checksums, and its structure.

        Raises
        ------
        CorruptStoreError
            Naming each damaged or missing file.

        Returns the :class:`~actstore.engine.verify.VerifyReport` when the store is sound.
        """
        self._check_open()
        from tqdm.auto import tqdm

        with tqdm(total=len(self), unit="row", desc="verify", disable=not progress) as bar:
            report = verify_store(self.path, self.manifest, bar.update)
        if report.problems:
            shown = "\n  ".join(report.problems[:20])
            more = f"\n  … and {len(report.problems) - 20} more" if len(report.problems) > 20 else ""
            raise CorruptStoreError(f"{self.path}: {len(report.problems)} problem(s):\n  {shown}{more}")
        return report

    def info(self) -> dict[str, Any]:
        """A summary: rows, fields, bytes on disk, fingerprint, layout."""
        self._check_open()
        size = 0
        for dirpath, _, names in os.walk(self.path):
            for name in names:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(dirpath, name)).st_size
        m = self.manifest
        return {
            "path": self.path,
            "format": f"actstore v{FORMAT_VERSION} (Zarr v3)",
            "rows": len(self),
            "fields": {n: {"shape": list(f.shape), "dtype": f.dtype, "ragged": f.ragged,
                           "compression": f"{f.compression} level {f.level}" if f.compression else None}
                       for n, f in self.fields.items()},
            "bytes_on_disk": size,
            "fingerprint": m.fingerprint,
            "created": m.created,
            "generation": m.generation,
            "segments": len(m.segments),
            "index_runs": len(m.indexes),
            "views": {n: v.rows for n, v in m.views.items()},
            "chunk_bytes": m.chunk_bytes,
            "layout": "one shard per array per segment; "
                      + ("uncompressed little-endian rows from offset 0" if not any(f.compression for f in self.fields.values())
                         else "compressed fields: one zstd frame per inner chunk; others: raw rows from offset 0"),
            "attrs": dict(m.attrs),
        }

    # -- views -----------------------------------------------------------------------
    @property
    def views(self) -> list[str]:
        """Names of the committed views."""
        return sorted(self.manifest.views)

    def view(self, name: str) -> np.ndarray:
        """A committed view: an int64 array of rows (-1 where a row is missing).  Never copies.

        Precompute records the dataset's order as a view, so that training can map
        dataset position ``i`` to its row without reading the dataset.
        """
        self._check_open()
        v = self._views.get(name)
        if v is None:
            info = self.manifest.views.get(name)
            if info is None:
                raise KeyError(f"view {name!r} is not in the store; it has {self.views}")
            v = self._views[name] = map_object_array(self.path, VIEWS_DIR, info, "row", "int64", self._check)
        return v

    def _map_views(self, manifest: Manifest) -> dict[str, np.ndarray]:
        # Mapped with the snapshot (like index runs): a writer deletes a replaced
        # view after its commit, and a map taken earlier survives that.
        return {
            name: map_object_array(self.path, VIEWS_DIR, info, "row", "int64", self._check)
            for name, info in manifest.views.items()
        }

    def set_view(self, name: str, rows: object) -> None:
        """Record (or replace) a named view of rows with the next commit.

        ``rows`` are committed row numbers, or -1 for "no row"; values outside
        ``[-1, len(store))`` are refused.
        """
        self._check_writable()
        try:
            check_name(name, "name")
        except StoreError as e:
            raise ValueError(str(e)) from None
        arr = np.asarray(rows)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"rows: expected a 1-D array of int rows, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        limit = len(self) + self.pending
        if arr.size and (arr.min() < -1 or arr.max() >= limit):
            raise ValueError(f"rows: values must lie in [-1, {limit}), got [{arr.min()}, {arr.max()}]")
        self._pending_views[name] = arr

    # -- writing --------------------------------------------------------------------
    def append(self, keys: object, values: Mapping[str, Any], *, allow_nonfinite: bool = True) -> int:
        """Buffer rows for the next commit; returns how many were new.

        Rows whose key is already stored (or already pending, or repeated in this
        batch) are skipped: keys are content addresses, so appending is
        idempotent.  The batch is validated whole before anything is written.

        Parameters
        ----------
        keys
            ``n`` 32-byte keys (a list of bytes or an ``(n, 32)`` uint8 array).
        values
            Field name → batch: ``(n, *shape)`` array-likes for fixed fields; a list
            of ``(length_i, *inner)`` arrays or a :class:`RaggedBatch` for ragged
            ones.  Values are cast to the field's dtype when that keeps their kind
            (int → float, float32 → float16); float → int, lossy integer narrowing
            and anything → bool are refused.
        allow_nonfinite
            NaN and ±inf are stored bit-exactly by default; ``False`` refuses a
            batch that holds any (after casting).

        Raises
        ------
        TypeError, ValueError
            Bad keys or values; the store is unchanged.
        """
        self._check_writable()
        karr, cols = validate_batch(self.fields, keys, values, allow_nonfinite=allow_nonfinite)
        new = self._new_rows(karr)
        if not new.any():
            return 0
        if not new.all():
            karr, cols = karr[new], _select(cols, new, self.fields)
        if self._segment is None:
            self._segment = SegmentWriter(self.path, self.fields, self.manifest.chunk_bytes)
        try:
            self._segment.write(karr, cols)
        except BaseException:
            # A half-written batch cannot be committed: drop the pending segment.
            self._segment.discard()
            self._segment = None
            raise
        return int(len(karr))

    def _new_rows(self, karr: np.ndarray) -> np.ndarray:
        new = self._snap.lookup(karr) < 0
        prefixes = key_prefixes(karr)
        sorted_prefixes = np.sort(prefixes)
        if len(karr) > 1 and bool((sorted_prefixes[1:] == sorted_prefixes[:-1]).any()):
            # Some prefixes repeat: keep the first occurrence of each whole key.
            _, first = np.unique(karr.view(np.dtype((np.void, 32))).ravel(), return_index=True)
            once = np.zeros(len(karr), bool)
            once[first] = True
            new &= once
        if self._segment is not None:
            new &= ~self._segment.keys_seen.contains(karr)
        return new

    def commit(self) -> int:
        """Make pending rows visible and durable; returns the new generation.

        When this returns, every file of the commit and the manifest are fsynced.
        With nothing pending it does nothing.
        """
        self._check_writable()
        seg, views = self._segment, self._pending_views
        if (seg is None or seg.rows == 0) and not views:
            return self.generation
        rows_after = len(self) + (seg.rows if seg is not None else 0)
        for name, rows in views.items():  # pending rows it named may have been dropped by a failed append
            if rows.size and int(rows.max()) >= rows_after:
                raise ValueError(
                    f"view {name!r} names row {int(rows.max())}, but this commit holds only {rows_after} rows "
                    "(pending rows were dropped by a failed append?); call set_view again"
                )
        self._segment, self._pending_views = None, {}
        manifest = self.manifest
        superseded: list[str] = []
        try:
            if seg is not None and seg.rows:
                info, prefixes = seg.finish()
                start = len(self)
                run = write_index_run(self.path, prefixes, np.arange(start, start + info.rows, dtype=np.int64))
                manifest = next_manifest(manifest, info, run)
                if len(manifest.indexes) > MAX_INDEX_RUNS:
                    manifest, superseded = self._merge_runs(manifest)
            if views:
                new_views = dict(manifest.views)
                for name, rows in views.items():
                    if name in new_views:
                        superseded.append(f"{VIEWS_DIR}/{new_views[name].id}")
                    new_views[name] = write_object(self.path, VIEWS_DIR, {"row": (rows, "int64")})
                manifest = replace(manifest, views=new_views, generation=self.generation + 1)
            write_manifest(self.path, manifest)
        except BaseException:
            self._after_failed_commit(seg, manifest)
            raise
        self._load(manifest)
        for rel in superseded:  # readers that mapped them earlier keep their maps
            shutil.rmtree(os.path.join(self.path, rel), ignore_errors=True)
        return manifest.generation

    def _after_failed_commit(self, seg: SegmentWriter | None, manifest: Manifest) -> None:
        """Keep whatever the manifest on disk references; discard the failed commit's segment otherwise.

        An error after the rename (in the directory fsync, or an interrupt) leaves
        the new manifest visible: its files must stay, and this handle adopts it
        (durability is then unknown, which the caller learns from the error).
        """
        try:
            on_disk = read_manifest(self.path)
        except (StoreError, OSError):
            on_disk = None  # unknown: delete nothing; the next open(mode="a") cleans up
        if on_disk is not None and manifest is not self.manifest and _ids(on_disk) == _ids(manifest):
            self._load(manifest)  # the rename happened
        elif seg is not None:
            if on_disk is None:
                seg.close_files()  # keep them: the manifest on disk is unknown
            else:
                seg.discard()

    def _merge_runs(self, manifest: Manifest) -> tuple[Manifest, list[str]]:
        snap = Snapshot(self.path, manifest)
        prefixes = np.concatenate([r.prefix for r in snap.runs])
        rows = np.concatenate([r.row for r in snap.runs])
        merged = write_index_run(self.path, prefixes, rows)
        return replace(manifest, indexes=(merged,)), [f"{INDEXES_DIR}/{r.id}" for r in manifest.indexes]

    def adopt(self, sources: object, *, copy: bool = False) -> int:
        """Add the committed rows of other stores with the same fields, in one commit; returns the rows added.

        A source segment whose keys are all new here is added whole: its
        immutable files are hard-linked into this store (copied where links are
        impossible, or with ``copy=True``) — no row is rewritten and nothing is
        read but its keys.  A segment holding keys that this store (or an earlier
        source) already has contributes only its new rows, copied through
        :meth:`append`.  Segments this store already lists (a source made by
        cloning this store) are skipped.  The new rows follow this store's rows,
        source by source; sources' views are not adopted.  Used by distributed
        precompute to merge the ranks' part stores.

        Parameters
        ----------
        sources
            Stores or paths (one, or a list).  Each must have this store's fields
            and, when both record one, its fingerprint.

        Raises
        ------
        StoreError
            Rows are pending (commit or abort them first).
        ValueError, StaleStoreError
            A source with other fields, or another model's fingerprint.
        """
        self._check_writable()
        if self.pending or self._pending_views:
            raise StoreError(f"{self.path}: {self.pending} rows are pending; commit() or abort() them before adopt()")
        from actstore.engine.keyset import KeySet
        from actstore.engine.writer import link_object
        from actstore.storage.files import inside, object_files

        items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        opened = [s if isinstance(s, ActivationStore) else open(s) for s in items]  # type: ignore[arg-type]
        try:
            for src in opened:
                if dict(src.fields) != dict(self.fields):
                    raise ValueError(f"{src.path}: other fields ({_describe(src.fields)}) than {self.path} "
                                     f"({_describe(self.fields)}); only stores of the same fields can be adopted")
                if src.fingerprint is not None and self.fingerprint is not None and src.fingerprint != self.fingerprint:
                    raise StaleStoreError(f"{src.path}: computed by another model than {self.path}")
            have = {s.id for s in self.manifest.segments}
            seen = KeySet()
            linked: list[Any] = []
            prefixes: list[np.ndarray] = []
            manifest = self.manifest
            try:
                for src in opened:
                    for seg, start in zip(src._snap.segments, src._snap._starts_list, strict=False):
                        if seg.info.id in have:
                            continue
                        have.add(seg.info.id)
                        keys = np.ascontiguousarray(seg.keys())
                        pre = key_prefixes(keys)
                        new = self._snap.lookup(keys) < 0
                        if len(seen):
                            new &= ~seen.contains(keys)
                        seen.add(keys[new])
                        if new.all():
                            _, files = object_files(seg.path, seg.info.meta, seg.path)
                            for rel, rec in files.items():
                                if os.stat(inside(seg.path, rel)).st_size != rec["size"]:
                                    raise CorruptStoreError(f"{seg.path}/{rel}: size differs from its record")
                            link_object(seg.path, os.path.join(self.path, SEGMENTS_DIR, seg.info.id), files, copy=copy)
                            linked.append(seg.info)
                            prefixes.append(pre)
                        elif new.any():
                            rows = start + np.flatnonzero(new)
                            for a in range(0, len(rows), 4096):
                                part = rows[a : a + 4096]
                                self.append(src.key_at(part), src.gather(part))
                pending = self._segment
                self._segment = None
                if pending is not None and pending.rows:
                    info, pre = pending.finish()
                    linked.append(info)
                    prefixes.append(pre)
                if not linked:
                    return 0
                start, total = len(self), sum(i.rows for i in linked)
                run = write_index_run(self.path, np.concatenate(prefixes), np.arange(start, start + total, dtype=np.int64))
                m = self.manifest
                manifest = replace(m, generation=m.generation + 1, segments=(*m.segments, *linked),
                                   indexes=(*m.indexes, run))
                superseded: list[str] = []
                if len(manifest.indexes) > MAX_INDEX_RUNS:
                    manifest, superseded = self._merge_runs(manifest)
                write_manifest(self.path, manifest)
            except BaseException:
                if self._segment is not None:  # rows copied by append() before the failure
                    self._segment.discard()
                    self._segment = None
                # linked or finished segments stay unreferenced: open(mode="a") deletes them
                self._after_failed_commit(None, manifest)
                raise
            self._load(manifest)
            for rel in superseded:
                shutil.rmtree(os.path.join(self.path, rel), ignore_errors=True)
            return total
        finally:
            for src, item in zip(opened, items, strict=True):
                if src is not item:
                    src.close()

    def abort(self) -> int:
        """Drop the pending rows; returns how many were dropped."""
        self._check_writable()
        n = self.pending
        self._pending_views = {}
        if self._segment is not None:
            self._segment.discard()
            self._segment = None
        return n

    def close(self) -> None:
        """Commit pending rows (writers), release the lock and drop this handle's maps.

        Tensors already returned stay valid: each holds its own reference to the map.
        """
        if self._closed:
            return
        try:
            if self.mode == "a" and (self._segment is not None or self._pending_views):
                self.commit()
        finally:
            self._closed = True
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never commit from a finaliser: only release the lock.
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only; use actstore.open(path, mode='a') to append")

    # -- pickling (DataLoader workers) -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        if self.mode != "r":
            raise TypeError(
                f"{self.path}: a store open for appending cannot be sent to another process; "
                "open it with mode='r' there"
            )
        # The snapshot travels with the handle: a worker reads the same commit.
        return {"path": self.path, "manifest": self.manifest.to_json(), "verify_reads": self._check is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "remote" in state:  # a store on object storage (also when made by ActivationStore.__new__)
            from actstore.remote import restore

            restore(self, state)
            return
        manifest = parse_manifest(state["manifest"], "pickled store")
        self.__init__(state["path"], manifest, mode="r", verify_reads=state.get("verify_reads", False))  # type: ignore[misc]


def _ids(m: Manifest) -> tuple[Any, ...]:
    """What identifies a commit: its generation and the ids of everything it references."""
    return (m.generation, [s.id for s in m.segments], [r.id for r in m.indexes], sorted((k, v.id) for k, v in m.views.items()))


def _select(cols: dict[str, Any], keep: np.ndarray, fields: Mapping[str, Field]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, col in cols.items():
        if fields[name].ragged:
            values, lengths = col
            ends = np.cumsum(lengths)
            parts = [values[e - n : e] for e, n, k in zip(ends, lengths, keep, strict=True) if k]
            out[name] = (np.concatenate(parts) if parts else values[:0], lengths[keep])
        else:
            out[name] = col[keep]
    return out
