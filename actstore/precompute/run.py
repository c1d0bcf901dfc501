"""The precompute run: read, key, deduplicate, batch, capture, hand over to the writer thread.

:class:`Run` carries one call of :func:`actstore.precompute` (documented there).
Its main loop, per DataLoader batch (a :class:`~actstore.precompute.items.Group`)::

    keys -> rows already in the store (the snapshot taken at start)
         -> keys already scheduled in this run (KeyTable: duplicates in the dataset)
         -> the rest is new: run the model on it, in batches of ``batch_size``
            (the group as the DataLoader collated it when all of it is new; else
            pooled with other groups' new samples and collated here)

Every dataset position gets a code: a committed row (>= 0), or ``-(s + 2)`` for
the ``s``-th sample scheduled in this run, resolved to its row when its batch
is handed to the writer.  At the end the codes become the ``"dataset"`` view.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.engine.write.validate import field_of
from actstore.errors import StaleStoreError, StoreError, StoreExistsError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.keys import key as content_key
from actstore.format.layout import INDEXES_DIR, LOCK_DIR, SEGMENTS_DIR, VIEWS_DIR
from actstore.format.record import RECORD_ATTR, ItemRecord, LayerRecord, PrecomputeRecord, read_record
from actstore.models.capture import LayerCapture, train_mode_matters
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.models.split import check_padding
from actstore.precompute.background import Job, Writer, convert_output
from actstore.precompute.items import Selector, SideColumn, SideColumns, encode_side
from actstore.precompute.keys import NOT_FOUND, KeyTable, row_digests
from actstore.precompute.loader import Group, IterableWrapper, Prepare, default_collate, field_name, qualname, to_device
from actstore.store import ActivationStore, read_manifest
from actstore.store import create as create_store
from actstore.store import delete_store as _delete_store
from actstore.store import open as open_store

__all__ = ["ATTR", "STORE_DTYPES", "VIEW", "Run"]

log = logging.getLogger("actstore")

#: Key of the precompute record in the store's attrs (actstore.format.record).
ATTR = RECORD_ATTR
#: The view that maps dataset positions to rows.
VIEW = "dataset"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- existing stores -----------------------------------------------------------------

class Run:
    """One precompute run: its state, and the steps of :func:`precompute`."""

    def __init__(self, model: nn.Module, dataset: Any, root: str, *, layers: list[str], batch_size: int,
                 field_names: dict[str, str] | None = None,
                 device: torch.device, collate_fn: Callable[[list[Any]], Any] | None, key_fn: Any,
                 store_dtype: torch.dtype | None, compression: str | None, num_workers: int,
                 quantize: str | None, progress: bool, selector: Selector,
                 side_fields: dict[str, Field | None], lengths_fn: Any, autocast: torch.dtype | None,
                 commit_every_rows: int | None, commit_every_seconds: float | None, max_in_flight: int,
                 overwrite: bool, compact: bool = True) -> None:
        self.model, self.dataset, self.root = model, dataset, root
        self.layers, self.batch_size, self.device = layers, batch_size, device
        self.fields = {layer: (field_names or {}).get(layer) or field_name(layer) for layer in layers}
        if len(set(self.fields.values())) != len(self.fields):
            raise ValueError(f"layers {layers} map to clashing field names {list(self.fields.values())}")
        self.collate_fn = collate_fn or default_collate
        self.key_fn = None if key_fn is content_key else key_fn
        self.lengths_fn, self.store_dtype, self.compression = lengths_fn, store_dtype, compression
        self.quantize, self.compact = quantize, compact
        self.num_workers, self.progress, self.selector = num_workers, progress, selector
        self.side_overrides, self.autocast, self.overwrite = side_fields, autocast, overwrite
        self.commit_every_rows, self.commit_every_seconds = commit_every_rows, commit_every_seconds
        self.max_in_flight = max_in_flight
        try:
            self.length: int | None = len(dataset)
        except TypeError:
            self.length = None
        self.map_style = hasattr(dataset, "__getitem__") and self.length is not None
        # run state
        self.store: ActivationStore | None = None  # the writer's handle
        self.reader: ActivationStore | None = None  # the snapshot at start, for lookups
        self.base = 0  # committed rows when the run started
        self.writer: Writer | None = None
        self.capture: LayerCapture | None = None
        self.structure: dict[str, Any] | None = None
        self.item: ItemRecord | None = None  # the items' layout, as recorded
        self.item_type: type | None = None  # every item's type (the first item's)
        self.side = SideColumns([])
        self.layer_fields: dict[str, Field] = {}
        self.ragged: set[str] = set()
        self.table = KeyTable()
        self.view: list[np.ndarray] = []
        self.order = np.empty(1024, np.int64)  # schedule id -> row
        self.pool: list[tuple[int, np.ndarray, Any, Any, int]] = []  # (schedule id, key, input, side, position)
        self.seen = self.scheduled = self.sent = self.skipped = self.duplicates = self.calls = 0
        self.conflicts: list[int] = []  # a few dataset positions whose side values differ from their row's
        self.n_conflicts = 0
        self.batches = 0

    # -- the run ------------------------------------------------------------------------
    def run(self) -> ActivationStore:
        fp = frozen_fingerprint(self.model, self.layers)  # the frozen part only: the head may train
        self._open_existing(fp)
        self.fp = fp
        was_training = self.model.training
        if train_mode_matters(self.model):
            warnings.warn("precompute runs the model in eval mode (no dropout in the stored rows); it was in "
                          "train mode and is put back in it afterwards", stacklevel=4)
        self.model.eval()
        self.t0 = time.perf_counter()
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.length, unit="sample", desc="precompute", disable=not self.progress,
                        dynamic_ncols=True, smoothing=0.1)
        self._last_postfix = 0.0
        try:
            self.model.to(self.device)
            self.capture = LayerCapture(self.model, self.layers)
            with self.capture:
                for group in self._loader():
                    self._on_group(group)
                    self._tick(len(group))
                while self.pool:
                    self._flush(min(len(self.pool), self.batch_size))
        except BaseException as e:
            self.bar.close()
            self.model.train(was_training)
            self._stop(failure=e)
            raise
        self.bar.close()
        self.model.train(was_training)
        self._stop(failure=None)
        return self._finish()

    def _open_existing(self, fp: str) -> None:
        root = self.root
        if not os.path.exists(root):
            return
        if not os.path.isdir(root):
            raise StoreExistsError(f"{root}: exists and is not a directory")
        if not os.path.exists(os.path.join(root, "zarr.json")):
            # A create() killed before its manifest leaves only the store's directories: resumable.
            if set(os.listdir(root)) - {SEGMENTS_DIR, INDEXES_DIR, VIEWS_DIR, LOCK_DIR}:
                raise StoreExistsError(f"{root}: exists, is not empty and is not an actstore store; "
                                       "pick another path (nothing there is deleted, even with overwrite=True)")
            return
        manifest = read_manifest(root)
        problem: StoreError | None = None
        config: PrecomputeRecord | None = None
        try:
            config = read_record(manifest.attrs, root)
        except StoreError as e:  # another version's record, or a damaged one
            problem = e
        if config is not None and config.placeholder and manifest.rows == 0:
            _delete_store(root)  # an empty store of an empty dataset: nothing to lose
            return
        want = {layer: f for layer, f in self.fields.items()}
        have = {d.layer: d.field for d in config.layers} if config is not None else None
        # Other layers have another frozen part, hence another fingerprint: name the layers, the clearer cause.
        if (have is None or have == want) and not fingerprint_matches(manifest.fingerprint, fp, self.model):
            problem = StaleStoreError(
                f"{root}: the store was computed by another model (fingerprint {str(manifest.fingerprint)[:16]}…, "
                f"this model's is {fp[:16]}…); pass overwrite=True (--overwrite) to delete and recompute it, "
                "or write to another path")
        elif problem is None and config is None:
            problem = StoreExistsError(f"{root}: holds a store that precompute did not write; pass overwrite=True "
                                       "to replace it, or write to another path")
        elif problem is None and have != want:
            problem = StoreExistsError(
                f"{root}: holds a store of other layers ({sorted(map(str, have or {}))}, fields "
                f"{_describe(manifest.fields)}) than requested ({sorted(want)}); pass overwrite=True "
                "(--overwrite) to replace it, or write to another path")
        if problem is not None:
            if not self.overwrite:
                raise problem
            _delete_store(root)
            return
        self.store = open_store(root, mode="a")
        self.reader = open_store(root, mode="r")
        self.base = len(self.reader)
        self.layer_fields = {n: f for n, f in self.store.fields.items() if n in self.fields.values()}
        self.ragged = {n for n, f in self.layer_fields.items() if f.ragged}

    def _loader(self) -> Any:
        ds = self.dataset
        if not self.map_style and not isinstance(ds, torch.utils.data.IterableDataset):
            if not isinstance(ds, Iterable):
                raise TypeError(f"dataset: expected a map-style dataset (len and [i]) or an iterable, "
                                f"got {type(ds).__name__}")
            if self.num_workers:
                raise ValueError("num_workers > 0 needs a torch Dataset or IterableDataset; a plain iterable "
                                 "cannot be shared between worker processes")
            ds = IterableWrapper(ds)
        prepare = Prepare(self.selector, self.key_fn, self.collate_fn, speculative=self.base == 0,
                          keep_inputs=not self.map_style)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=prepare,
            pin_memory=self.device.type == "cuda")
        return iter(loader)

    def _tick(self, n: int) -> None:
        self.bar.update(n)
        now = time.perf_counter()
        if self.progress and now - self._last_postfix > 0.5:
            self._last_postfix = now
            w = self.writer
            mb = (w.bytes if w else 0) / 1e6 / max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{mb:.1f} MB/s written, {self.skipped} cached", refresh=False)
        if self.writer is not None:
            self.writer.raise_error()

    # -- one DataLoader batch -----------------------------------------------------------
    def _on_group(self, g: Group) -> None:
        n, pos0 = len(g), self.seen
        if g.error is not None:
            j, e = g.error
            kind = type(e) if isinstance(e, (TypeError, ValueError, KeyError, IndexError)) else RuntimeError
            raise kind(f"dataset[{pos0 + j}]: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e
        if self.item_type is None:
            self.item_type = g.item_type
        elif g.item_type is not None and g.item_type is not self.item_type:
            raise TypeError(f"dataset[{pos0}]: the item is a {g.item_type.__name__}, but the items before it are "
                            f"{self.item_type.__name__}: a dataset's items must all have one type")
        self.seen += n
        if self.structure is None:
            self._init_structure(g)
        positions = list(range(pos0, pos0 + n))
        digests = self._digests(g.sides, positions)
        codes = np.full(n, NOT_FOUND, np.int64)
        if self.base:
            rows = self.reader.lookup(g.keys)  # type: ignore[union-attr]
            hit = rows >= 0
            codes[hit] = rows[hit]
            self.skipped += int(hit.sum())
            if digests is not None and hit.any():
                self._check_hits(rows[hit], digests[hit], np.asarray(positions)[hit])
        miss = np.nonzero(codes == NOT_FOUND)[0]
        if len(miss):
            tcodes, tdig = self.table.lookup(g.keys[miss])
            old = tcodes != NOT_FOUND
            codes[miss[old]] = tcodes[old]
            self.duplicates += int(old.sum())
            if digests is not None:
                self._check_dups(tdig[old], digests[miss[old]], miss[old] + pos0)
            miss = miss[~old]
        new: np.ndarray = np.empty(0, np.int64)
        if len(miss):  # schedule the first occurrence of each new key; later ones share its code
            void = np.ascontiguousarray(g.keys[miss]).view(np.dtype((np.void, 32))).ravel()
            _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
            first_of = miss[first][inverse.ravel()]  # group index of each miss's first occurrence
            new = np.sort(miss[first])
            sched = -(np.arange(self.scheduled, self.scheduled + len(new), dtype=np.int64) + 2)
            self.scheduled += len(new)
            codes[new] = sched
            self.table.add(g.keys[new], sched, None if digests is None else digests[new])
            codes[miss] = codes[first_of]
            dup = first_of != miss
            self.duplicates += int(dup.sum())
            if digests is not None and dup.any():
                self._check_dups(digests[first_of[dup]], digests[miss[dup]], miss[dup] + pos0)
        self.view.append(codes)
        if len(new) == n and g.collated is not None:  # the common case: the whole group is new
            self._run_batch(g.keys, -codes - 2, g.collated, g.sides, positions)
            return
        for j in new:
            x = g.inputs[j] if g.inputs is not None else self.selector.split(self.dataset[pos0 + int(j)])[0]
            self.pool.append((int(-codes[j] - 2), g.keys[j], x, g.sides[j], pos0 + int(j)))
        while len(self.pool) >= self.batch_size:
            self._flush(self.batch_size)

    def _flush(self, n: int) -> None:
        part, self.pool = self.pool[:n], self.pool[n:]
        keys = np.stack([p[1] for p in part])
        batch = self.collate_fn([p[2] for p in part])
        self._run_batch(keys, np.array([p[0] for p in part], np.int64), batch, [p[3] for p in part],
                        [p[4] for p in part])

    # -- structure of the items -------------------------------------------------------
    def _init_structure(self, g: Group) -> None:
        self.structure = dict(g.structure or {"type": "bare"})
        columns: list[SideColumn] = []
        dropped = []
        for name, value in (g.sides[0] or {}).items():
            override = self.side_overrides.get(name, ...)
            if override is None:
                dropped.append(name)
                continue
            kind, spec = encode_side(name, value)
            if isinstance(override, Field):
                spec = override
                kind = kind if kind in ("str", "bytes") and spec == Field((None,), "uint8") else "array"
            fname = field_name(f"item_{name}" if self.structure["type"] == "tuple" else name)
            if fname in self.fields.values() or fname in {c.field for c in columns}:
                raise ValueError(f"side column {name!r} would be stored as field {fname!r}, which is taken by a "
                                 f"layer; drop it with side_fields={{{name!r}: None}}")
            columns.append(SideColumn(name, fname, kind, spec))
        unknown = set(self.side_overrides) - {c.name for c in columns} - set(dropped)
        if unknown:
            raise ValueError(f"side_fields names {sorted(unknown)}, which the items do not have "
                             f"(side columns: {sorted(g.sides[0] or {})})")
        self.side = SideColumns(columns)
        self.structure["side"] = [c.to_json() for c in columns]
        self.structure["dropped"] = dropped
        self.item = ItemRecord.from_json(self.structure, "the first item")
        if self.store is not None:
            self._check_config()

    def _record(self, placeholder: bool = False) -> PrecomputeRecord:
        return PrecomputeRecord(
            layers=tuple(LayerRecord(layer, f, f in self.ragged) for layer, f in self.fields.items()),
            item=None if placeholder else self.item,
            view=VIEW,
            dataset_length=self.length,
            dataset_class=qualname(self.dataset),
            model_class=qualname(self.model),
            store_dtype=None if self.store_dtype is None else dtype_name(self.store_dtype),
            key_fn=qualname(self.key_fn) or "actstore.key",
            collate_fn=qualname(self.collate_fn),
            placeholder=placeholder,
        )

    def _check_config(self) -> None:
        assert self.store is not None
        have = read_record(self.store.attrs, self.root) or PrecomputeRecord(item=None)
        mine = self._record()
        diffs = [k for k, a, b in (("sample", have.item, mine.item), ("key_fn", have.key_fn, mine.key_fn)) if a != b]
        side = {c.field: c.spec for c in self.side.columns}
        if any(self.store.fields.get(f) != spec for f, spec in side.items()) or set(self.store.fields) != set(
                side) | set(self.fields.values()):
            diffs.append("side fields")
        if self.store_dtype is not None:
            for f in self.layer_fields.values():
                if f.spec.torch.is_floating_point and f.dtype != dtype_name(self.store_dtype):
                    diffs.append("store_dtype")
                    break
        if self.compression is not None and any(f.compression != self.compression for f in self.layer_fields.values()):
            diffs.append("compression")
        if self.quantize is not None and any(f.quantize != self.quantize for f in self.layer_fields.values()
                                             if f.spec.torch.is_floating_point):
            diffs.append("quantize")
        if not diffs:
            return
        msg = (f"{self.root}: holds a store of this model and layers, but with another {', '.join(diffs)} "
               f"(stored: {None if have.item is None else have.item.to_json()}, store dtype {have.store_dtype}; "
               f"now: {None if mine.item is None else mine.item.to_json()})")
        if not self.overwrite:
            raise StoreExistsError(msg + "; pass overwrite=True (--overwrite) to replace it, or use another path")
        assert self.reader is not None
        self.store.close()
        self.reader.close()
        self.store = self.reader = None
        self.base = 0
        self.layer_fields, self.ragged = {}, set()
        _delete_store(self.root)

    # -- side-value conflicts between duplicates ----------------------------------------
    def _digests(self, sides: list[Any], positions: list[int]) -> np.ndarray | None:
        if not self.side.columns:
            return None
        cols = self.side.convert(sides, positions)
        return row_digests(cols, [c.field for c in self.side.columns], len(sides))

    def _check_hits(self, rows: np.ndarray, digests: np.ndarray, positions: np.ndarray) -> None:
        assert self.reader is not None
        names = [c.field for c in self.side.columns]
        stored = row_digests(self.reader.gather(rows, names), names, len(rows))
        self._check_dups(stored, digests, positions)

    def _check_dups(self, first: np.ndarray, now: np.ndarray, positions: np.ndarray) -> None:
        differ = positions[first != now]
        self.conflicts += [int(p) for p in differ[: max(0, 5 - len(self.conflicts))]]
        self.n_conflicts += len(differ)

    # -- one forward ------------------------------------------------------------------------
    def _run_batch(self, keys: np.ndarray, sched: np.ndarray, batch: Any, sides: list[Any], positions: list[int]) -> None:
        mask = self._token_mask(batch)
        dev_batch = batch if self.device.type == "cpu" else to_device(batch, self.device)
        assert self.capture is not None
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if self.autocast is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
            captured = self.capture.run_inputs(dev_batch)
            self.calls += 1
            outputs = {self.fields[layer]: t for layer, t in captured.items()}
            self._check_batch_first(outputs, len(keys))
            if self.writer is None:
                self._start_writer(outputs, mask)
            self._check_outputs(outputs, mask)
            index, lengths = self._token_index(mask, outputs)
            job = Job(keys, outputs, index, lengths, sides, positions)
            if self.device.type == "cuda":
                self._to_host(job)
        rows = np.arange(self.base + self.sent, self.base + self.sent + len(keys), dtype=np.int64)
        if sched.max(initial=-1) >= len(self.order):
            self.order = np.concatenate([self.order, np.empty(max(len(self.order), int(sched.max()) + 1), np.int64)])
        self.order[sched] = rows
        self.sent += len(keys)
        self.batches += 1
        assert self.writer is not None
        self.writer.put(job)

    def _token_mask(self, batch: Any) -> torch.Tensor | None:
        """The batch's token mask (bool, host), or its lengths when ``lengths_fn`` is given."""
        if self.lengths_fn is not None:
            return torch.as_tensor(self.lengths_fn(batch), dtype=torch.int64).cpu()
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            check_padding(self.model, batch["attention_mask"])  # left padding would make rows batch-dependent
            return batch["attention_mask"].cpu().bool()
        return None

    def _is_token_level(self, t: torch.Tensor, mask: torch.Tensor | None) -> bool:
        if mask is None or t.ndim < 3:
            return False
        return self.lengths_fn is not None or t.shape[1] == mask.shape[1]

    def _token_index(self, mask: torch.Tensor | None, outputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        if not self.ragged:
            return None, None
        width = {outputs[f].shape[1] for f in self.ragged}
        if len(width) > 1:
            raise ValueError(f"token-level layers have different token counts {sorted(width)} in one batch")
        assert mask is not None
        if self.lengths_fn is not None:  # lengths, right padding
            lengths = mask
            mask = torch.arange(width.pop())[None, :] < lengths[:, None]
        lengths = mask.sum(1)
        return mask.reshape(-1).nonzero().squeeze(1), lengths

    def _start_writer(self, outputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
        if self.store is None:
            fields: dict[str, Field] = {}
            for name, t in outputs.items():
                ragged = self._is_token_level(t, mask)
                fields[name] = field_of(t[0], ragged=ragged, dtype=self.store_dtype, compression=self.compression,
                                        quantize=self.quantize)
                if ragged:
                    self.ragged.add(name)
            self.layer_fields = dict(fields)
            fields.update({c.field: c.spec for c in self.side.columns})
            self.store = create_store(self.root, fields, fingerprint=self.fp, attrs={ATTR: self._record().to_json()})
        self.writer = Writer(self.store, self.layer_fields, self.side, max_in_flight=self.max_in_flight,
                             commit_every_rows=self.commit_every_rows, commit_every_seconds=self.commit_every_seconds)
        self.writer.start()

    def _layer(self, field: str) -> str:
        return next(layer for layer, f in self.fields.items() if f == field) or "<final output>"

    def _check_batch_first(self, outputs: dict[str, torch.Tensor], n: int) -> None:
        for name, t in outputs.items():
            if t.ndim == 0 or t.shape[0] != n:
                raise ValueError(f"layer {self._layer(name)!r}: output of shape {tuple(t.shape)} does not start with "
                                 f"the batch dimension ({n}); capture a layer whose output is batch-first")

    def _check_outputs(self, outputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
        for name, t in outputs.items():
            f = self.layer_fields[name]
            layer = self._layer(name)
            if f.ragged:
                if not self._is_token_level(t, mask):
                    raise ValueError(
                        f"layer {layer!r}: stored as token-level (ragged {f.shape}), but this batch gives "
                        f"{tuple(t.shape)} without a matching token mask (attention_mask or lengths_fn)")
                got, want = tuple(t.shape[2:]), f.inner_shape
            else:
                got, want = tuple(t.shape[1:]), f.inner_shape
            if got != want:
                raise ValueError(
                    f"layer {layer!r}: this batch's outputs have shape {got} per sample"
                    f"{' (per token)' if f.ragged else ''}, but earlier batches (field {name!r}) have {want}; a "
                    "fixed-shape field needs the same shape for every sample (pad or resize the inputs, or give "
                    "precompute a token mask if the layer is token-level)")

    def _to_host(self, job: Job) -> None:
        """GPU: trim and cast on the device, then copy to pinned memory without waiting."""
        out: dict[str, Any] = {}
        for name, t in job.outputs.items():
            v = convert_output(t, name in self.ragged, job.token_index, job.lengths, self.layer_fields[name].spec.torch)
            src = v.values if name in self.ragged else v
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
            out[name] = type(v)(host, v.offsets) if name in self.ragged else host
        job.outputs, job.done = out, True
        job.event = torch.cuda.Event()
        job.event.record()

    # -- the end --------------------------------------------------------------------------
    def _stop(self, failure: BaseException | None) -> None:
        """Write and commit what was computed, also after a failure; release the store.

        After a ``failure`` nothing here raises (so that it propagates); other
        errors met on the way are logged.
        """
        try:
            err: BaseException | None = None
            if self.writer is not None:
                try:
                    self.writer.finish()  # writes the batches computed before the failure
                except BaseException as e:
                    err = e
                if self.store is not None and (failure is not None or err is not None):
                    try:  # rows appended before a failing batch are whole: keep them
                        self.store.commit()
                    except Exception:
                        log.warning("precompute: could not commit after an error", exc_info=True)
                if err is not None:
                    if failure is None:
                        raise err
                    if err is not failure:
                        log.warning("precompute: the writer thread failed too: %r", err)
            if failure is None:
                self._record_view()  # one commit: the last rows and the view
                if self.compact and self.store is not None and len(self.store.manifest.segments) > 1:
                    self._compact()
        finally:
            if self.store is not None:
                with contextlib.suppress(Exception):
                    self.store.close()
            if self.reader is not None:
                self.reader.close()

    def _compact(self) -> None:
        """Merge the run's segments into one; a failure (no space for the copy, say) keeps every committed row."""
        assert self.store is not None
        t0 = time.perf_counter()
        try:
            report = self.store.compact()
        except (OSError, StoreError) as e:
            warnings.warn(f"{self.root}: precompute finished, but merging its {len(self.store.manifest.segments)} "
                          f"segments failed ({e}); every row is committed, reads span the segments until "
                          "store.compact() or `actstore compact` succeeds", RuntimeWarning, stacklevel=4)
            return
        log.info("precompute: %s in %.1f s", report, time.perf_counter() - t0)

    def _record_view(self) -> None:
        if self.store is None:  # an empty dataset and no store: shapes are unknown, so fields are placeholders
            fields = {f: Field((None,), dtype_name(self.store_dtype or torch.float32), compression=self.compression,
                               quantize=self.quantize)
                      for f in self.fields.values()}
            config = self._record(placeholder=True).to_json()
            self.store = create_store(self.root, fields, fingerprint=self.fp, attrs={ATTR: config})
        codes = np.concatenate(self.view) if self.view else np.empty(0, np.int64)
        sched = codes < 0
        codes[sched] = self.order[-codes[sched] - 2]
        self.store.set_view(VIEW, codes)
        self.store.commit()

    def _finish(self) -> ActivationStore:
        elapsed = time.perf_counter() - self.t0
        written = self.writer.rows if self.writer else 0
        nbytes = self.writer.bytes if self.writer else 0
        if self.seen == 0:
            _say(self.progress, f"precompute: the dataset is empty; created an empty store at {self.root}")
        if self.n_conflicts:
            log.warning(
                "precompute: %d dataset positions repeat an earlier input with different side values (%s); the "
                "store keeps one row per input, with the side values seen first",
                self.n_conflicts, ", ".join(f"dataset[{p}]" for p in self.conflicts))
        _say(self.progress,
             f"precompute: {written:,} rows written, {self.skipped:,} skipped (already stored), {self.duplicates:,} "
             f"duplicates, {nbytes / 1e6:,.1f} MB in {elapsed:.1f} s ({self.seen / max(elapsed, 1e-9):,.1f} "
             f"samples/s, {nbytes / 1e6 / max(elapsed, 1e-9):,.1f} MB/s) -> {self.root}")
        return open_store(self.root)


def _say(printed: bool, message: str) -> None:
    log.info("%s", message)
    if printed:
        print(message, flush=True)


def _describe(fields: Mapping[str, Field]) -> str:
    return ", ".join(f"{n}: {f.dtype}{list(f.shape)}" for n, f in fields.items())
