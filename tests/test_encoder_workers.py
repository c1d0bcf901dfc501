"""RecycledEncoder(append=True) inside DataLoader workers: every miss is stored once (fork and spawn)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import actstore
from actstore.training.encoder import RecycledEncoder

DISTINCT, ITEMS = 23, 60


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class Samples(Dataset):  # type: ignore[type-arg]
    """``ITEMS`` items holding ``DISTINCT`` distinct samples: the same samples reach both workers."""

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.arange(4, dtype=torch.float32) + float((i * 7) % DISTINCT)


class Encode:
    """The collate: the encoder runs in the worker, computing (and storing) misses there."""

    def __init__(self, enc: RecycledEncoder) -> None:
        self.enc = enc

    def __call__(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = torch.stack(batch)
        return x, self.enc(x), os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_misses_computed_in_workers_are_stored_once(tmp_path: Path, method: str) -> None:
    path = tmp_path / "enc"
    frozen = Frozen()
    enc = RecycledEncoder(frozen, str(path), append=True, commit_every_rows=4)
    for _ in range(2):
        loader = DataLoader(Samples(), batch_size=5, num_workers=2, collate_fn=Encode(enc), timeout=300,
                            multiprocessing_context=mp.get_context(method))
        pids = set()
        for x, out, pid in loader:
            pids.add(pid)
            with torch.no_grad():
                torch.testing.assert_close(out, frozen(x), rtol=0, atol=1e-5)  # (misses: computed in sub-batches)
        assert len(pids) == 2 and os.getpid() not in pids
        enc.commit()  # the owner adopts the workers' parts
    enc.close()
    s = actstore.open(path)
    assert len(s) == DISTINCT and s.verify().rows == DISTINCT  # every miss stored once, from whichever worker
    xs = torch.stack([Samples()[i] for i in range(DISTINCT)])
    rows = s.lookup([actstore.key(x) for x in xs])
    assert (rows >= 0).all()
    with torch.no_grad():
        torch.testing.assert_close(s.gather(rows)["activations"], frozen(xs), rtol=0, atol=1e-5)  # (batch rounding)
    assert not os.path.exists(f"{path}.worker-parts")  # every part adopted and deleted


def test_a_forked_worker_never_writes_to_the_owners_store(tmp_path: Path) -> None:
    """The owner's open store: a worker's misses go to its part, never through the owner's writer."""
    path = tmp_path / "enc"
    frozen = Frozen()
    enc = RecycledEncoder(frozen, str(path), append=True)
    enc(torch.stack([Samples()[0]]))  # the owner creates the store and holds its writer
    assert enc.store is not None and enc.store.mode == "a"
    loader = DataLoader(Samples(), batch_size=5, num_workers=2, collate_fn=Encode(enc), timeout=300,
                        multiprocessing_context=mp.get_context("fork"))
    got: list[Any] = [out for _, out, _ in loader]
    assert len(got) == ITEMS // 5
    enc.close()
    s = actstore.open(path)
    assert len(s) == DISTINCT and np.unique(s.key_at(np.arange(len(s))), axis=0).shape[0] == DISTINCT
