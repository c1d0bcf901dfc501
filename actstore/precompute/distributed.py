"""Distributed precompute: ``torchrun`` starts N processes, each computes a disjoint part of the dataset.

:func:`actstore.precompute` comes here only when launched by ``torchrun`` (``RANK``
and ``WORLD_SIZE`` in the environment, or a process group already initialised)
with ``WORLD_SIZE`` > 1; a single process never runs this module's code (it
adopts leftover parts itself, through :mod:`actstore.precompute.parts`)::

    all ranks   check they agree (world size, dataset length, model fingerprint,
                layers, path) — an error on every rank before anything is written
    rank 0      adopts leftover parts of an interrupted run into the store at PATH
    every rank  clones PATH (hard links) into PATH/parts/<run>-<rank> and runs the
                ordinary single-process pipeline there, on its blocks of the
                dataset (block b = positions [b*B, (b+1)*B) with B the batch
                size, for b ≡ rank mod world size) — no coordination per batch; the clone
                makes it skip every key PATH already has, and its commits make a
                killed rank's work resumable
    rank 0      (after all ranks finished) adopts the parts' new segments into
                PATH in one commit (hard links, one key-index run), writes the
                whole dataset's "dataset" view (the parts' side values per
                position, in global position order), deletes the parts
    every rank  returns PATH opened for reading

**Partition by whole batches, dedupe by key.**  A rank reads only its own
items: items are loaded and decoded once in all, not once per rank, which
partitioning by key would need (the key is a hash of the loaded item).  Blocks
of exactly one batch make every batch a rank computes a batch one process would
compute, which matters: on the CPU a sample's output can differ in the last bit
with the batch's shape (measured here: a Linear layer computes a row
differently in a batch of fewer than 4 rows).  Keys still decide what is done:
each rank skips keys the store already has, so a resumed run with another world
size recomputes nothing, and a sample that appears in two ranks' blocks is
computed by both but stored once (adoption keeps the first part's row).  A fresh
run therefore stores the same keys and the same values, bit for bit, as one
process; rows computed in batches that one process would have formed
differently (repeated samples, a resumed run) have the same keys and values
equal up to such last-bit differences — exactly as a resumed single-process run
does.  The row *order* differs (rank by rank); the ``"dataset"`` view hides it.

**Processes.**  Collectives are a few ``all_gather_object`` /
``broadcast_object_list`` calls on a gloo group (this module initialises the
default group with gloo from ``env://`` if torchrun's workers have none, and
destroys it at the end; with a user's NCCL group it adds a gloo group).  Each
rank computes on ``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` modulo
the GPUs of the node; or the device given), else the CPU.  PATH must be one filesystem every rank sees (local for
one node; a shared filesystem for several), and a local path: to publish to
object storage, ``actstore push PATH s3://...`` afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.engine.read.views import ViewColumns
from actstore.environment import environment
from actstore.errors import StaleStoreError, StoreError, StoreExistsError, StoreLockedError
from actstore.format.record import read_record
from actstore.models.fingerprint import frozen_fingerprint
from actstore.precompute.augment import AugmentedItems
from actstore.precompute.config import VIEW, PrecomputeConfig
from actstore.precompute.parts import (
    adopt_leftovers,
    delete_part,
    len_of,
    merge_view_columns,
    open_or_create_main,
    parts_dir,
    parts_lock,
    record_length,
    remove_parts_dir,
)
from actstore.precompute.resume import is_placeholder
from actstore.precompute.run import Run
from actstore.store import ActivationStore, clone_store
from actstore.store import open as open_store

__all__ = ["DistInfo", "RankIterable", "RankSlice", "detect", "global_position", "precompute_ranks"]

#: Seconds a rank waits for the others to join and to agree (a launch whose ranks disagree fails after this).
TIMEOUT_SECONDS = float(os.environ.get("ACTSTORE_DIST_TIMEOUT", 900))
#: Seconds a rank that finished its part waits for the slowest one (torchrun stops every rank when one dies).
WAIT_SECONDS = float(os.environ.get("ACTSTORE_DIST_WAIT", 7 * 86400))
_ERRORS: dict[str, type[BaseException]] = {e.__name__: e for e in (
    StoreError, StoreExistsError, StoreLockedError, StaleStoreError, ValueError, TypeError, KeyError, IndexError)}


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed launch."""

    rank: int
    world: int
    local_rank: int


def detect() -> DistInfo | None:
    """The launch this process belongs to (torchrun's environment, or an initialised group), or None."""
    env = environment()
    return DistInfo(env.rank, env.world, env.local_rank) if env.launched else None


# --- the dataset, split by position --------------------------------------------------------


class RankSlice(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Rank ``rank``'s blocks of a map-style dataset: blocks ``b ≡ rank (mod world)`` of ``block`` positions each.

    With ``block`` = the batch size, every batch a rank computes is a batch one
    process would compute (same samples, same shape), so outputs match bit for
    bit even where a kernel's result depends on the batch shape.
    """

    def __init__(self, dataset: Any, rank: int, world: int, block: int = 1) -> None:
        self.dataset, self.rank, self.world, self.block = dataset, rank, world, block
        total = len(dataset)
        mine = range(rank, math.ceil(total / block), world)
        self.n = sum(min(block, total - b * block) for b in mine)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for rank {self.rank}'s {self.n} items")
        return self.dataset[global_position(i, self.rank, self.world, self.block)]


def global_position(i: Any, rank: int, world: int, block: int) -> Any:
    """Dataset position of a rank's ``i``-th item (ints or int arrays)."""
    return ((i // block) * world + rank) * block + i % block


class RankIterable(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Rank ``rank``'s blocks of an iterable (every rank still iterates the whole source, skipping the others')."""

    def __init__(self, iterable: Any, rank: int, world: int, block: int = 1) -> None:
        self.iterable, self.rank, self.world, self.block = iterable, rank, world, block

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.iterable):
            if (i // self.block) % self.world == self.rank:
                yield item


def _slice(dataset: Any, rank: int, world: int, block: int) -> Any:
    try:
        len(dataset)
        map_style = hasattr(dataset, "__getitem__")
    except TypeError:
        map_style = False
    return RankSlice(dataset, rank, world, block) if map_style else RankIterable(dataset, rank, world, block)


# --- entry point ----------------------------------------------------------------------------


def precompute_ranks(model: torch.nn.Module, dataset: Any, root: str, cfg: PrecomputeConfig) -> ActivationStore:
    """This rank's share of a distributed precompute into ``root`` (absolute, local); returns ``root`` opened.

    :func:`actstore.precompute` calls this only when launched with a world size
    above 1, after checking the arguments (``cfg``) and the path.
    """
    info = detect()
    if info is None or info.world < 2:
        raise RuntimeError("precompute_ranks: not launched by torchrun with WORLD_SIZE > 1")
    with _Group() as quick:
        return _Ranks(model, dataset, root, cfg, info, quick).run()


class _Group:
    """The gloo group for joining, agreeing and merging (``TIMEOUT_SECONDS``; the wait for the slowest rank's part
    uses a second one, made after the ranks agree, with ``WAIT_SECONDS``).  The default group is initialised here
    from ``env://`` (and destroyed at the end) if torchrun's workers have none."""

    def __enter__(self) -> Any:
        dist = torch.distributed
        self.owned = not dist.is_initialized()
        quick = datetime.timedelta(seconds=TIMEOUT_SECONDS)
        try:
            if self.owned:
                dist.init_process_group("gloo", timeout=quick)
                q = None
            else:
                q = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=quick)
        except (RuntimeError, ValueError) as e:
            self.__exit__()
            raise RuntimeError(_join_hint(e)) from e
        return q

    def __exit__(self, *exc: object) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _join_hint(e: BaseException) -> str:
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return (f"precompute: the ranks did not all join within {TIMEOUT_SECONDS:.0f} s (this process: "
            f"{', '.join(f'{k}={v}' for k, v in env.items())}); nothing was written.  Check that every rank was "
            "launched with the same world size (torchrun --nnodes/--nproc-per-node on every node) and can reach "
            f"MASTER_ADDR, or raise ACTSTORE_DIST_TIMEOUT.  ({type(e).__name__}: {str(e)[:300]})")


class _Ranks:
    def __init__(self, model: torch.nn.Module, dataset: Any, root: str, cfg: PrecomputeConfig, info: DistInfo,
                 quick: Any) -> None:
        self.model, self.dataset, self.root, self.cfg = model, dataset, root, cfg
        self.rank, self.world, self.group = info.rank, info.world, quick
        self.slow: Any = None
        self.local_rank = info.local_rank
        self.parts = parts_dir(root)
        self.batch_size = cfg.execution.batch_size

    # -- collectives -----------------------------------------------------------------------
    def gather(self, obj: Any, slow: bool = False) -> list[Any]:
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.slow if slow else self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def settle(self, error: BaseException | None, what: str, slow: bool = False) -> None:
        """Every rank learns whether any failed at ``what``; all raise if one did."""
        statuses = self.gather(None if error is None else (type(error).__name__, str(error)), slow)
        if error is not None:
            raise error
        for r, st in enumerate(statuses):
            if st is not None:
                kind = _ERRORS.get(st[0], RuntimeError)
                raise kind(f"rank {r} failed {what}: {st[0]}: {st[1]}")

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> ActivationStore:
        layers = self.cfg.capture.layers
        fp = frozen_fingerprint(self.model, layers)
        self.check_agreement(fp)
        self.slow = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_SECONDS))
        lock = None
        run_id = None
        err: BaseException | None = None
        if self.rank == 0:
            try:
                lock = parts_lock(self.parts)
                adopt_leftovers(self.root, fp, layers, self.cfg.storage.overwrite, len_of(self.dataset))
                run_id = uuid.uuid4().hex[:12]
            except BaseException as e:
                err = e
        try:
            self.settle(err, f"preparing {self.root}")
            run_id = self.broadcast(run_id)
            part = os.path.join(self.parts, f"{run_id}-{self.rank:05d}")
            err = None
            try:
                self.compute(part)
            except BaseException as e:
                err = e
            self.settle(err, "computing its part (committed rows stay in PATH/parts and are adopted on the next run)",
                        slow=True)
            err = None
            if self.rank == 0:
                try:
                    self.merge(fp, run_id)
                except BaseException as e:
                    err = e
            self.settle(err, f"merging the parts into {self.root}")
        finally:
            if lock is not None:
                lock.release()
        if self.rank == 0:
            remove_parts_dir(self.root)
        return open_store(self.root)

    def check_agreement(self, fp: str) -> None:
        mine = {"world": self.world, "WORLD_SIZE": os.environ.get("WORLD_SIZE"), "dataset_length": len_of(self.dataset),
                "fingerprint": fp, "layers": self.cfg.capture.layers, "path": self.root,
                "batch_size": self.batch_size}
        try:
            every = self.gather(mine)
            ranks_seen = self.gather(self.rank)
        except RuntimeError as e:
            raise RuntimeError(_join_hint(e)) from e
        problems = []
        if sorted(ranks_seen) != list(range(self.world)):
            problems.append(f"ranks {sorted(ranks_seen)} are not 0..{self.world - 1}")
        for key in mine:
            values = [e[key] for e in every]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}"[:120] for r, v in enumerate(values))
                problems.append(f"{key} differs between ranks ({shown})")
        if problems:
            raise ValueError("precompute: the ranks of this launch disagree, nothing was written: " + "; ".join(problems))

    def compute(self, part: str) -> None:
        ex = self.cfg.execution
        device = ex.device
        if device.type == "cuda" and device.index is None:  # (more ranks than GPUs on a node: they share them)
            device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(device)
        cfg = dataclasses.replace(self.cfg, execution=dataclasses.replace(
            ex, device=device, progress=ex.progress and self.rank == 0))
        os.makedirs(self.parts, exist_ok=True)
        if os.path.exists(os.path.join(self.root, "zarr.json")):
            clone_store(self.root, part)  # the pipeline then skips every key the store has
        store = Run(self.model, _slice(self.dataset, self.rank, self.world, self.batch_size), part, cfg).run()
        store.close()

    def merge(self, fp: str, run_id: str) -> None:
        names = sorted(n for n in os.listdir(self.parts) if n.startswith(run_id + "-"))
        if len(names) != self.world:
            raise StoreError(f"{self.parts}: expected {self.world} parts of run {run_id}, found {len(names)}")
        n = len_of(self.dataset)
        parts = [open_store(os.path.join(self.parts, name)) for name in names]
        try:
            main = open_or_create_main(self.root, parts, fp, self.cfg.storage.overwrite, n)
            try:
                main.adopt([p for p in parts if not is_placeholder(p)])
                view, pieces = self._view(main, parts, n)
                columns, fields, item_key = merge_view_columns(pieces, len(view))
                main.set_view(VIEW, view, columns, fields=fields, item_key=item_key)
                main.commit()
                record_length(main, n)
                rows = len(main)
            finally:
                main.close()
        finally:
            for p in parts:
                p.close()
        for name in names:
            delete_part(os.path.join(self.parts, name))
        record = read_record(parts[0].attrs, parts[0].path)
        if self.cfg.execution.progress:
            print(f"precompute: {self.world} ranks -> {self.root}: {rows:,} rows "
                  f"({None if record is None else record.dataset_class})", flush=True)

    def _view(self, main: ActivationStore, parts: list[ActivationStore],
              n: int | None) -> tuple[np.ndarray, list[tuple[np.ndarray, ViewColumns]]]:
        """The whole dataset's ``"dataset"`` view in ``main``, from each rank's view of its part; and each part's
        view columns (side values per position) with their global positions."""
        keys_at = np.zeros((0 if n is None else n, 32), np.uint8)
        have = np.zeros(len(keys_at), bool)
        pieces: list[tuple[np.ndarray, ViewColumns]] = []
        for r, p in enumerate(parts):
            if VIEW not in p.views:
                continue
            v = np.asarray(p.view(VIEW))
            pos = global_position(np.arange(len(v)), r, self.world, self.batch_size)
            if isinstance(self.dataset, AugmentedItems):  # run order -> the view's item-major order
                pos = self.dataset.view_positions(pos)
            cols = p.view_columns(VIEW)
            if cols is not None and len(v):
                pieces.append((pos, cols))
            if n is None and len(pos):  # an iterable: the length is known only now
                need = int(pos.max()) + 1
                if need > len(keys_at):
                    keys_at = np.concatenate([keys_at, np.zeros((need - len(keys_at), 32), np.uint8)])
                    have = np.concatenate([have, np.zeros(need - len(have), bool)])
            ok = v >= 0
            keys_at[pos[ok]] = p.key_at(v[ok])
            have[pos[ok]] = True
        if n is None:
            last = np.flatnonzero(have)
            end = int(last[-1]) + 1 if len(last) else 0
            keys_at, have = keys_at[:end], have[:end]
        view = np.full(len(keys_at), -1, np.int64)
        if have.any():
            view[have] = main.lookup(keys_at[have])
        return view, pieces
