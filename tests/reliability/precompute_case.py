"""A small, exactly reproducible precompute job for the crash tests.

The model has small integer weights and the inputs are small integers, so every
activation is an exactly representable float32 whatever the batch composition
or summation order: a resumed run must store bit-identical values.  The dataset
repeats some samples (deduplicated by key) and carries a side column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import actstore
import actstore.store as store_mod
from actstore.precompute.api import precompute

N = 240
LAYERS = ["1", "2"]
BATCH = 8
COMMIT_EVERY = 24


def model() -> nn.Module:
    g = torch.Generator().manual_seed(5)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    return m.eval()


def sample(i: int) -> tuple[torch.Tensor, int]:
    j = i if i % 10 != 9 else i - 7  # every tenth sample repeats an earlier one
    x = torch.tensor([(j // 3**k) % 3 - 1 for k in range(8)], dtype=torch.float32)  # distinct for j < 3**8
    return x, j % 3


def dataset(n: int = N) -> list[tuple[torch.Tensor, int]]:
    return [sample(i) for i in range(n)]


def expected(n: int = N) -> dict[bytes, dict[str, np.ndarray]]:
    """key -> the values a clean run stores (computed one sample at a time)."""
    m = model()
    out: dict[bytes, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for x, _ in dataset(n):
            k = actstore.key(x)
            h1 = m[1](m[0](x))
            out[k] = {"1": h1.numpy(), "2": m[2](h1).numpy()}  # rows: activations only (labels: per position)
    return out


def run(path: str, n: int = N, batch_size: int = BATCH, commit_every: int = COMMIT_EVERY, log: Any = None,
        num_workers: int = 0) -> Any:
    if log is not None:  # log every commit, so the parent knows which row counts were committed
        real = store_mod.ActivationStore.commit

        def commit(self: Any) -> int:
            log(f"committing {len(self) + self.pending}")
            g = real(self)
            log(f"committed {len(self)}")
            return g

        store_mod.ActivationStore.commit = commit  # type: ignore[method-assign]
    return precompute(model(), dataset(n), path, layers=LAYERS, batch_size=batch_size,
                      commit_every_rows=commit_every, commit_every_seconds=None, progress=False,
                      num_workers=num_workers)


def check(path: str, allowed: set[int] | None, want: dict[bytes, dict[str, np.ndarray]], complete: bool) -> int:
    """The store holds whole rows of a clean run, no key twice; complete: all of them, and the view."""
    with actstore.open(path) as s:
        s.verify()
        n = len(s)
        if allowed is not None:
            assert n in allowed, f"{n} rows: not the row count of any commit that could have happened {sorted(allowed)}"
        if n == 0:
            assert not complete
            return 0
        keys = s.key_at(np.arange(n))
        got = s.gather(np.arange(n))
        seen = set()
        for r in range(n):
            k = bytes(keys[r])
            assert k in want, f"row {r} has a key no sample has"
            assert k not in seen, f"key of row {r} stored twice"
            seen.add(k)
            for f, v in want[k].items():
                assert np.array_equal(got[f][r].numpy(), v), f"row {r} field {f}: {got[f][r]} != {v}"
        if complete:
            assert seen == set(want), f"{len(want) - len(seen)} keys missing"
            view = s.view("dataset")
            data = dataset()
            assert len(view) == len(data)
            labels = s.view_columns("dataset")["item_1"]
            for i, (x, label) in enumerate(data):
                assert bytes(keys[view[i]]) == actstore.key(x), f"view 'dataset'[{i}] points at the wrong row"
                assert int(labels[i]) == label, f"view 'dataset' column item_1[{i}]: {int(labels[i])} != {label}"
    return n
