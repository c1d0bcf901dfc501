"""The precompute run: one call of :func:`actstore.precompute` (documented there), start to end.

:class:`Run` orchestrates; each step is another module's job::

    parts.adopt_leftover_parts   rows an interrupted distributed run left in PATH/parts
    resume.open_existing         the store at PATH: resume it, create one, or refuse
    loader.Prepare               DataLoader workers: split items, key them, collate
    structure.item_structure     the first batch: side columns, the item record
    resume.keep_or_replace       a resumed store must hold this run's configuration
    schedule.Schedule            per batch: stored, already scheduled, or new (computed once)
    forward.Forward              the model on the new samples; device -> host
    background.Writer            the writer thread: trim, cast, append, commit
    items.PositionSides          per batch: each position's side values and input key
    Run._stop / _record_view     the last commit: the "dataset" view with its columns; compaction

New samples are computed in batches of ``batch_size``: the group as the
DataLoader collated it when all of it is new, else pooled with other groups'
new samples and collated here.  A distributed rank runs the same :class:`Run`
on its slice of the dataset, into its part store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.errors import StoreError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.format.record import ItemRecord, PrecomputeRecord
from actstore.models.capture import train_mode_matters
from actstore.models.fingerprint import frozen_fingerprint
from actstore.precompute.augment import AugmentedItems
from actstore.precompute.background import Writer
from actstore.precompute.config import ATTR, VIEW, PrecomputeConfig
from actstore.precompute.forward import Forward
from actstore.precompute.inputs import check_recollated
from actstore.precompute.items import PositionSides, SideColumns
from actstore.precompute.loader import Group, IterableWrapper, Prepare
from actstore.precompute.parts import adopt_leftover_parts, has_leftovers, item_major, len_of
from actstore.precompute.resume import Resumed, keep_or_replace, open_existing, run_record
from actstore.precompute.schedule import Schedule
from actstore.precompute.structure import item_structure
from actstore.storage.scratch import scratch_dir
from actstore.store import ActivationStore
from actstore.store import create as create_store
from actstore.store import open as open_store

__all__ = ["Run", "format_rate"]

log = logging.getLogger("actstore")


class Run:
    """One precompute run into the local directory ``root`` (absolute), with the checked options ``cfg``."""

    def __init__(self, model: nn.Module, dataset: Any, root: str, cfg: PrecomputeConfig) -> None:
        self.model, self.dataset, self.root, self.cfg = model, dataset, root, cfg
        self.length = len_of(dataset)
        self.map_style = hasattr(dataset, "__getitem__") and self.length is not None
        # The per-position bookkeeping (keys, codes, side values) lives in scratch files there: page cache, not heap.
        self.scratch = scratch_dir(os.path.dirname(root))
        self.resumed: Resumed | None = None  # the store found at root, continued
        self.store: ActivationStore | None = None  # the writer's handle
        self.writer: Writer | None = None
        self.forward: Forward | None = None
        self.schedule = Schedule(None, 0, self.scratch)
        self.item: ItemRecord | None = None  # the items' layout, as recorded (known after the first batch)
        self.item_type: type | None = None  # every item's type (the first item's)
        self.side = SideColumns([])
        self.positions = PositionSides(self.side, self.scratch)  # side values, input key per position: view columns
        self.row_sides = False  # a store written before format 3: side values are row fields too (first position's)
        self.pool: list[tuple[int, np.ndarray, Any, Any, int, np.ndarray]] = []  # (schedule id, key, input, side,
        # position, input key)
        self.seen = 0
        self.signature: tuple[str, int] | None = None  # (the collated batches' structure, where first seen)
        self._groups = 0  # the workers' first batches seen so far, and the first one's keys (_check_sharding)
        self._first_keys: set[bytes] | None = None

    # -- the run ------------------------------------------------------------------------
    def run(self) -> ActivationStore:
        self.t0 = time.perf_counter()  # the summary's time covers the whole run (fingerprint and resume included)
        fp = frozen_fingerprint(self.model, self.cfg.capture.layers)  # the frozen part only: the head may train
        if has_leftovers(self.root):  # an interrupted distributed run's committed parts: adopt them first
            adopt_leftover_parts(self.root, fp, self.cfg, self.length)
        self.resumed = open_existing(self.root, self.cfg, fp, self.model)
        if self.resumed is not None:
            self.store = self.resumed.store
            self.schedule = Schedule(self.resumed.reader, self.resumed.base, self.scratch)
        self.fp = fp
        was_training = self.model.training
        if train_mode_matters(self.model):
            warnings.warn("precompute runs the model in eval mode (no dropout in the stored rows); it was in "
                          "train mode and is put back in it afterwards", stacklevel=4)
        self.model.eval()
        from tqdm.auto import tqdm  # (not imported with actstore)

        self.bar = tqdm(total=self.length, unit="sample", desc="precompute", disable=not self.cfg.execution.progress,
                        dynamic_ncols=True, smoothing=0.1)
        self._last_postfix = 0.0
        batch_size = self.cfg.execution.batch_size
        try:
            self.model.to(self.cfg.execution.device)
            self.forward = Forward(self.model, self.cfg, None if self.resumed is None else self.resumed.layer_fields)
            with self.forward:
                for group in self._loader():
                    self._on_group(group)
                    self._tick(len(group))
                while self.pool:
                    self._flush(min(len(self.pool), batch_size))
        except BaseException as e:
            self.bar.close()
            self.model.train(was_training)
            self._stop(failure=e)
            raise
        self.bar.close()
        self.model.train(was_training)
        self._stop(failure=None)
        return self._finish()

    def _loader(self) -> Any:
        ds = self.dataset
        ex = self.cfg.execution
        if not self.map_style and not isinstance(ds, torch.utils.data.IterableDataset):
            if not isinstance(ds, Iterable):
                raise TypeError(f"dataset: expected a map-style dataset (len and [i]) or an iterable, "
                                f"got {type(ds).__name__}")
            if ex.num_workers:
                raise ValueError("num_workers > 0 needs a torch Dataset or IterableDataset; a plain iterable "
                                 "cannot be shared between worker processes")
            ds = IterableWrapper(ds)
        items = self.cfg.items
        prepare = Prepare(items.selector, items.key_fn, items.collate_fn,
                          keep_inputs=not self.map_style or items.augment is not None,
                          lengths_fn=self.cfg.capture.lengths_fn, augment=items.augment)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=ex.batch_size, shuffle=False, num_workers=ex.num_workers, collate_fn=prepare,
            pin_memory=ex.device.type == "cuda")
        return iter(loader)

    def _tick(self, n: int) -> None:
        self.bar.update(n)
        now = time.perf_counter()
        if self.cfg.execution.progress and now - self._last_postfix > 0.5:
            self._last_postfix = now
            written = self.writer.bytes if self.writer else 0
            rate = f"{format_rate(written, now - self.t0)} written, " if written else ""  # none before the first write
            self.bar.set_postfix_str(f"{rate}{self.schedule.skipped} cached", refresh=False)
        if self.writer is not None:
            self.writer.raise_error()

    # -- one DataLoader batch -----------------------------------------------------------
    def _on_group(self, g: Group) -> None:
        n, pos0 = len(g), self.seen
        if g.error is not None:
            j, e = g.error
            kind = type(e) if isinstance(e, (TypeError, ValueError, KeyError, IndexError, OSError)) else RuntimeError
            where = f"dataset[{pos0}:{pos0 + n}] (one batch)" if g.batch_error else f"dataset[{pos0 + j}]"
            if isinstance(self.dataset, AugmentedItems):  # run positions of AugmentedItems: item p, augmentation v
                where = self.dataset.describe(pos0, pos0 + n) if g.batch_error else self.dataset.describe(pos0 + j)
            raise kind(f"{where}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from e
        if g.signature is not None and self.signature is None:
            self.signature = (g.signature, pos0)
        elif g.signature is not None and self.signature is not None and g.signature != self.signature[0]:
            raise TypeError(f"dataset[{pos0}:{pos0 + n}]: collate_fn returned a {g.signature} for this batch, but a "
                            f"{self.signature[0]} for the batch at dataset[{self.signature[1]}]: a collate must give "
                            "every batch the same structure (the same dict keys), or samples could not be compared "
                            "across batches; fix collate_fn (pad or drop optional keys consistently)")
        if self.item_type is None:
            self.item_type = g.item_type
        elif g.item_type is not None and g.item_type is not self.item_type:
            raise TypeError(f"dataset[{pos0}]: the item is a {g.item_type.__name__}, but the items before it are "
                            f"{self.item_type.__name__}: a dataset's items must all have one type")
        self.seen += n
        self._check_sharding(g)
        if self.item is None:
            self._init_structure(g)
        self.positions.add(g.keys, g.sides, range(pos0, pos0 + n))
        codes, new = self.schedule.place(g.keys, pos0)
        if len(new) == n and g.collated is not None:  # the common case: the whole group is new
            self._run_batch(g.keys, Schedule.schedule_id(codes), g.collated, g.sides, list(range(pos0, pos0 + n)))
            return
        for j in new:
            x = g.inputs[j] if g.inputs is not None else self.cfg.items.selector.split(self.dataset[pos0 + int(j)])[0]
            checked = g.keys[j] if g.input_keys is None else g.input_keys[j]  # what a recollate must give
            self.pool.append((int(Schedule.schedule_id(codes[j])), g.keys[j], x, g.sides[j], pos0 + int(j), checked))
        batch_size = self.cfg.execution.batch_size
        while len(self.pool) >= batch_size:
            self._flush(batch_size)

    def _check_sharding(self, g: Group) -> None:
        """Warn when every DataLoader worker reads the same items of an IterableDataset (it does not shard itself).

        The loader takes one batch from each worker in turn, so with ``W``
        workers the first ``W`` batches are each worker's first: when they hold
        the same keys, each worker read the dataset from the start.  actstore
        never shards a dataset on its own (one that shards itself would lose
        items); the repeats are computed once, but the ``"dataset"`` view is ``W``
        times as long.
        """
        workers = self.cfg.execution.num_workers
        if workers < 2 or self.map_style or self._groups >= workers:
            return
        self._groups += 1
        keys = {bytes(k) for k in g.keys}
        if self._first_keys is None:
            self._first_keys = keys
        elif keys and keys == self._first_keys:
            self._groups = workers  # warned once
            warnings.warn(
                f"dataset: the {workers} DataLoader workers each read the same items of the IterableDataset "
                f"{type(self.dataset).__name__}, from its start: it does not shard itself across workers. Split its "
                "items in __iter__ with torch.utils.data.get_worker_info() (id, num_workers), or use num_workers=1; "
                "actstore never shards a dataset on its own. Every item is computed once, but the 'dataset' view "
                "lists each item once per worker", RuntimeWarning, stacklevel=4)

    def _flush(self, n: int) -> None:
        part, self.pool = self.pool[:n], self.pool[n:]
        keys = np.stack([p[1] for p in part])
        batch = self.cfg.items.collate_fn([p[2] for p in part])
        if self.cfg.items.key_fn is None:  # the rows must be computed from exactly what was keyed
            check_recollated(batch, np.stack([p[5] for p in part]), [p[2] for p in part], [p[4] for p in part],
                             self.cfg.capture.lengths_fn,
                             self.dataset.describe if isinstance(self.dataset, AugmentedItems) else None)
        self._run_batch(keys, np.array([p[0] for p in part], np.int64), batch, [p[3] for p in part],
                        [p[4] for p in part])

    def _init_structure(self, g: Group) -> None:
        self.side, self.item = item_structure(g, self.cfg)
        if self.resumed is not None and not keep_or_replace(self.resumed, self.root, self.cfg, self._record(),
                                                            self.side):
            # replaced (overwrite=True): start afresh
            assert self.forward is not None
            self.resumed = self.store = None
            self.schedule = Schedule(None, 0, self.scratch)
            self.forward.layer_fields = {}
        self.positions = PositionSides(self.side, self.scratch)
        # A store written before side values moved to the view holds them as row fields: its new rows need them.
        self.row_sides = self.resumed is not None and any(c.field in self.resumed.store.fields
                                                          for c in self.side.columns)

    def _record(self, placeholder: bool = False) -> PrecomputeRecord:
        ragged = set() if self.forward is None else self.forward.ragged
        return run_record(self.cfg, item=self.item, ragged=ragged, length=self.length, dataset=self.dataset,
                          model=self.model, placeholder=placeholder)

    def _run_batch(self, keys: np.ndarray, sched: np.ndarray, batch: Any, sides: list[Any], positions: list[int]) -> None:
        assert self.forward is not None
        job = self.forward(batch, keys, sides, positions)
        if self.writer is None:
            self._start_writer()
        self.schedule.rows_for(sched)
        assert self.writer is not None
        self.writer.put(job)

    def _start_writer(self) -> None:
        assert self.forward is not None
        layer_fields = self.forward.layer_fields
        if self.store is None:  # rows hold activations only; side values go to the view (FORMAT.md §8)
            self.store = create_store(self.root, dict(layer_fields), fingerprint=self.fp,
                                      attrs={ATTR: self._record().to_json()})
        commits = self.cfg.commits
        row_sides = self.side if self.row_sides else SideColumns([])
        self.writer = Writer(self.store, layer_fields, row_sides, max_in_flight=self.cfg.execution.max_in_flight,
                             commit_every_rows=commits.every_rows, commit_every_seconds=commits.every_seconds,
                             described={f: self.cfg.describe(f) for f in layer_fields},
                             allow_overflow=self.cfg.storage.allow_overflow)
        self.writer.start()

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
                before = self._previous_view()
                self._record_view()  # one commit: the last rows and the view
                if self.cfg.commits.compact and self.store is not None:
                    drop = self._reclaimable(before) if self.cfg.commits.reclaim else None
                    if len(self.store.manifest.segments) > 1 or drop is not None and drop.size:
                        self._compact(drop)
        finally:
            if self.store is not None:
                with contextlib.suppress(Exception):
                    self.store.close()
            if self.resumed is not None:
                self.resumed.reader.close()

    def _previous_view(self) -> np.ndarray | None:
        """The ``dataset`` view of the store this run resumed (a copy), or None."""
        if self.store is None or self.resumed is None or VIEW not in self.store.views:
            return None
        return np.array(self.store.view(VIEW))

    def _reclaimable(self, before: np.ndarray | None) -> np.ndarray | None:
        """Rows the previous ``dataset`` view referenced and no view (the new one included) references now.

        Never rows that no view ever referenced (a RecycledEncoder's, or another
        run's kept through ``index="keys"``): only the previous view's rows are candidates.
        """
        assert self.store is not None
        if before is None:
            return None
        referenced = np.zeros(len(self.store), bool)
        for name in self.store.views:
            rows = self.store.view(name)
            referenced[rows[rows >= 0]] = True
        old = np.unique(before[before >= 0])
        return old[~referenced[old]]

    def _compact(self, drop: np.ndarray | None = None) -> None:
        """Merge the run's segments into one, without the rows ``drop``; a failure (no space for the copy, say)
        keeps every committed row."""
        assert self.store is not None
        t0 = time.perf_counter()
        try:
            report = self.store.compact(drop=drop) if drop is not None and drop.size else self.store.compact()
        except (OSError, StoreError) as e:
            warnings.warn(f"{self.root}: precompute finished, but merging its {len(self.store.manifest.segments)} "
                          f"segments failed ({e}); every row is committed, reads span the segments until "
                          "store.compact() or `actstore compact` succeeds", RuntimeWarning, stacklevel=4)
            return
        log.info("precompute: %s in %.1f s", report, time.perf_counter() - t0)

    def _record_view(self) -> None:
        if self.store is None:  # an empty dataset and no store: shapes are unknown, so fields are placeholders
            storage = self.cfg.storage
            fields = {f: Field((None,), dtype_name(storage.store_dtype or torch.float32),
                               compression=storage.compression, quantize=storage.quantize)
                      for f in self.cfg.capture.fields.values()}
            config = self._record(placeholder=True).to_json()
            self.store = create_store(self.root, fields, fingerprint=self.fp, attrs={ATTR: config})
        columns, fields, keys = self.positions.view_columns()
        item_key: np.ndarray | None = keys
        view = self.schedule.view()
        if isinstance(self.dataset, AugmentedItems) and len(view):  # run order -> the view's item-major order
            view, columns, item_key = item_major(self.dataset, view, columns, fields, item_key)
        self.store.set_view(VIEW, view, columns, fields=fields, item_key=item_key)
        if self.resumed is not None and self.item is not None:  # the record of this run (its key scheme, collate)
            self.store.update_attrs({ATTR: self._record().to_json()})
        self.store.commit()

    def _finish(self) -> ActivationStore:
        store = open_store(self.root)
        size = store.info()["bytes_on_disk"]
        elapsed = time.perf_counter() - self.t0
        written = self.writer.rows if self.writer else 0
        nbytes = self.writer.bytes if self.writer else 0
        progress, s = self.cfg.execution.progress, self.schedule
        if self.seen == 0:
            _say(progress, f"precompute: the dataset is empty; created an empty store at {self.root}")
        _say(progress,
             f"precompute: {written:,} rows written, {s.skipped:,} skipped (already stored), {s.duplicates:,} "
             f"duplicates in {elapsed:.1f} s ({self.seen / max(elapsed, 1e-9):,.1f} samples/s, rows written at "
             f"{format_rate(nbytes, elapsed)}); the store: {size / 1e6:,.1f} MB on disk "
             f"-> {self.root}")
        return store


def format_rate(nbytes: float, seconds: float) -> str:
    """``nbytes`` over ``seconds`` in the unit that shows it (B/s, kB/s, MB/s or GB/s, decimal), e.g. ``'850.3 kB/s'``."""
    per = nbytes / max(seconds, 1e-9)
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if per >= scale:
            return f"{per / scale:,.1f} {unit}"
    return f"{per:,.1f} B/s"


def _say(printed: bool, message: str) -> None:
    log.info("%s", message)
    if printed:
        print(message, flush=True)
