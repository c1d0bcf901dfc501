"""Where this process runs: rank, world size, local rank, DataLoader worker — one function, called at use time.

Both precompute (which rank computes which part) and training (which rows a
rank and a worker read) ask :func:`environment` when they start iterating, not
when they are constructed: a dataset built before ``init_process_group`` or
pickled into a DataLoader worker still sees the right place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Environment", "environment"]


@dataclass(frozen=True, slots=True)
class Environment:
    """This process's place: ``rank`` of ``world`` processes (``local_rank`` on its node), DataLoader ``worker`` of
    ``workers`` (0 of 1 outside a worker).  ``launched`` says whether a launcher (torchrun) or an initialised process
    group set the rank, even with one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    worker: int = 0
    workers: int = 1
    launched: bool = False


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r}: not an integer (set by the launcher, e.g. torchrun)") from e


def environment() -> Environment:
    """This process's rank, world size and DataLoader worker, now.

    The initialised default process group wins; else torchrun's ``RANK`` and
    ``WORLD_SIZE`` (both needed); else a single process.  Raises ``ValueError``
    when those variables are not integers.
    """
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Environment(torch.distributed.get_rank(), torch.distributed.get_world_size(), local, worker, workers,
                           True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Environment(_env_int("RANK"), _env_int("WORLD_SIZE"), local, worker, workers, True)
    return Environment(0, 1, local, worker, workers, False)
