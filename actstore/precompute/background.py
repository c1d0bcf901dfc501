"""The writer thread of :func:`actstore.precompute`: trim, cast, append, commit.

The model produces batches on the main thread; :class:`Writer` takes them from a
bounded queue (so memory stays bounded: at most ``max_in_flight`` batches wait)
and does everything else on a background thread, so that the model never waits
for the disk.  The first error stops the thread and is re-raised in the
producer by :meth:`Writer.put` or :meth:`Writer.finish`.

Every cast to a narrower store dtype is range-checked (:class:`CastCheck`)
before anything of its batch is appended: a finite output that float16 cannot
hold raises :class:`~actstore.CastOverflowError` (or, with
``allow_overflow``, is clamped to float16's largest value), never becomes inf.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.engine.read.ragged import RaggedBatch
from actstore.engine.write.validate import (
    cast_overflow,
    clamp_finite,
    extremes_overflow,
    finite_extremes,
    narrows,
    overflow_error,
)
from actstore.format.fields import Field
from actstore.precompute.items import SideColumns

__all__ = ["CastCheck", "Job", "Writer", "convert_output"]


@dataclass
class CastCheck:
    """The range check of one field's cast to the store dtype, for one batch.

    On the CPU it checks (or clamps) right before the cast: one min/max pass
    over the batch.  On a GPU it only starts the min/max on the device and its
    copy to the host (no synchronisation); the writer thread calls
    :meth:`after_copy` once the batch has arrived, before appending anything.
    """

    where: str  #: the field, for messages: "field 'h' (layer 'encoder.layer.2')"
    allow_overflow: bool = False
    extremes: Any = None  #: a device batch's finite (min, max), on its way to the host
    dtype: Any = None

    def before_cast(self, x: Any, dtype: torch.dtype) -> Any:
        """``x`` (an array or tensor about to be cast to ``dtype``), checked; clamped with ``allow_overflow``."""
        if not narrows(x.dtype, dtype):
            return x
        on_device = isinstance(x, torch.Tensor) and x.device.type != "cpu"
        if on_device:  # no host synchronisation: clamp blindly (only when allowed), or check later
            if self.allow_overflow:
                return clamp_finite(x, dtype)
            ext = finite_extremes(x)
            self.extremes = torch.empty(ext.shape, dtype=ext.dtype, pin_memory=True).copy_(ext, non_blocking=True)
            self.dtype = dtype
            return x
        big = cast_overflow(x, dtype)
        if big is None:
            return x
        if self.allow_overflow:
            return clamp_finite(x, dtype)
        raise self.error(big, dtype)

    def after_copy(self) -> None:
        """Raise for a device batch whose extremes overflow (call after its copy completed)."""
        if self.extremes is not None:
            big = extremes_overflow(self.extremes, self.dtype)
            if big is not None:
                raise self.error(big, self.dtype)

    def error(self, big: float, dtype: torch.dtype) -> Exception:
        return overflow_error(self.where, big, dtype, 'precompute(..., store_dtype="{dtype}"), --dtype {dtype}',
                              "allow_overflow=True (--allow-overflow)")


@dataclass
class Job:
    """One computed batch on its way to the store."""

    keys: np.ndarray
    outputs: dict[str, torch.Tensor]  # field -> (n, ...) or padded (n, L, ...) tensor, or flat values if `done`
    token_index: torch.Tensor | None  # flat indices of real tokens in (n * L), for ragged fields
    lengths: torch.Tensor | None
    sides: list[dict[str, Any] | None]
    positions: list[int]
    event: Any = None  # a CUDA event to wait on before reading `outputs`
    done: bool = False  # outputs already trimmed and cast (GPU path)
    checks: list[CastCheck] | None = None  # the GPU path's range checks, completed by the writer thread


class Writer(threading.Thread):
    """Trims, casts, appends and commits batches on a background thread.

    At most ``max_in_flight`` jobs wait in the queue, which bounds memory; the
    producer blocks (checking :attr:`error`) when it is full.  The first error
    stops the thread; :meth:`put` and :meth:`finish` re-raise it in the caller.
    """

    def __init__(self, store: Any, layer_fields: Mapping[str, Field], side: SideColumns, *, max_in_flight: int,
                 commit_every_rows: int | None, commit_every_seconds: float | None,
                 described: Mapping[str, str] | None = None, allow_overflow: bool = False) -> None:
        super().__init__(name="actstore-precompute-writer", daemon=True)
        self.store = store
        self.layer_fields = dict(layer_fields)
        self.described = dict(described or {})  # field -> how messages name it
        self.allow_overflow = allow_overflow
        self.side = side
        self.commit_every_rows = commit_every_rows
        self.commit_every_seconds = commit_every_seconds
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_in_flight))
        self.error: BaseException | None = None
        self.rows = 0
        self.bytes = 0
        self.commits = 0
        self._since_commit = 0
        self._last_commit = time.monotonic()

    # -- producer side ---------------------------------------------------------------
    def put(self, job: Job) -> None:
        while True:
            self.raise_error()
            try:
                self.queue.put(job, timeout=0.05)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Write what is queued, stop the thread, and re-raise its error if it had one."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.05)
                break
            except queue.Full:
                continue
        self.join()
        self.raise_error()

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    job = self.queue.get()
                    if job is None:
                        break
                    self._write(job)
        except BaseException as e:  # handed to the producer
            self.error = e
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _write(self, job: Job) -> None:
        if job.event is not None:
            job.event.synchronize()
        for check in job.checks or ():
            check.after_copy()  # before anything of the batch is appended
        values: dict[str, Any] = {}
        for name, out in job.outputs.items():
            values[name] = out if job.done else self._convert(name, out, job)
        values.update(self.side.convert(job.sides, job.positions))
        new = self.store.append(job.keys, values)
        if new != len(job.keys):  # the producer deduplicates; anything else breaks row numbering
            raise RuntimeError(f"internal error: {len(job.keys) - new} rows of a batch were already stored")
        n = len(job.keys)
        self.rows += n
        self.bytes += sum(_nbytes(v) for v in values.values()) + job.keys.nbytes
        self._since_commit += n
        now = time.monotonic()
        if (self.commit_every_rows is not None and self._since_commit >= self.commit_every_rows) or (
            self.commit_every_seconds is not None and now - self._last_commit >= self.commit_every_seconds
        ):
            self.commit()

    def commit(self) -> None:
        self.store.commit()
        self.commits += 1
        self._since_commit = 0
        self._last_commit = time.monotonic()

    def _convert(self, name: str, out: torch.Tensor, job: Job) -> Any:
        f = self.layer_fields[name]
        check = CastCheck(self.described.get(name, f"field {name!r}"), self.allow_overflow)
        return convert_output(out, f.ragged, job.token_index, job.lengths, f.spec.torch, check)


def convert_output(out: torch.Tensor, ragged: bool, token_index: torch.Tensor | None, lengths: torch.Tensor | None,
                   dtype: torch.dtype, check: CastCheck) -> Any:
    """Trim a padded token-level output to its real tokens and cast floats to ``dtype``, range-checked by ``check``.

    Returns a tensor (fixed fields) or a :class:`RaggedBatch`.  Works on any device;
    on the CPU it uses numpy (single-threaded), leaving torch's threads to the
    model.  Copies once when trimming or casting, else returns ``out`` itself
    (a clamp, only with ``allow_overflow`` and values out of range, copies once more).
    """
    cast = out.is_floating_point() and out.dtype != dtype
    if out.device.type == "cpu" and torch.bfloat16 not in (out.dtype, dtype):
        arr = out.numpy()
        if ragged:
            assert token_index is not None
            arr = arr.reshape(-1, *arr.shape[2:])[token_index.numpy()]
        if cast:
            arr = check.before_cast(arr, dtype).astype(_NUMPY[dtype])
        out = torch.from_numpy(arr) if (ragged or cast) else out
    else:
        if ragged:
            assert token_index is not None
            flat = out.reshape(out.shape[0] * out.shape[1], *out.shape[2:])
            out = flat.index_select(0, token_index.to(out.device, non_blocking=True))
        if cast:
            out = check.before_cast(out, dtype).to(dtype)
    if ragged:
        assert lengths is not None
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths.cpu(), 0, out=offsets[1:])
        return RaggedBatch(out, offsets)
    return out


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


def _nbytes(v: Any) -> int:
    if isinstance(v, RaggedBatch):
        return v.values.element_size() * v.values.numel() + v.offsets.numel() * 8
    if isinstance(v, torch.Tensor):
        return v.element_size() * v.numel()
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    return sum(_nbytes(x) for x in v) if isinstance(v, list) else 0
