"""precompute refuses two names of one module as two fields, and warns about an IterableDataset read once per worker."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import actstore


class Aliased(nn.Module):
    """One module under two names (``b`` is ``a``), as sentence-transformers' ``auto_model`` and ``model``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = self.a
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x))


@pytest.mark.parametrize("layers", [["a", "b"], {"a": "first", "b": "second"}])
def test_two_names_of_one_module_are_refused_not_dropped(tmp_path: Path, layers: object) -> None:
    data = [torch.full((4,), float(i)) for i in range(8)]
    with pytest.raises(ValueError, match="two names of one module"):
        actstore.precompute(Aliased(), data, tmp_path / "s", layers=layers, progress=False)  # type: ignore[arg-type]
    s = actstore.precompute(Aliased(), data, tmp_path / "ok", layers=["a", "a"], progress=False)  # one name twice
    assert set(s.fields) == {"a"}


class Items(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, n: int, shard: bool) -> None:
        self.n, self.shard = n, shard

    def __iter__(self) -> Iterator[torch.Tensor]:
        lo, hi = 0, self.n
        info = torch.utils.data.get_worker_info()
        if self.shard and info is not None:
            per = math.ceil(self.n / info.num_workers)
            lo, hi = info.id * per, min(self.n, (info.id + 1) * per)
        for i in range(lo, hi):
            yield torch.full((4,), float(i))


def test_an_iterable_dataset_read_whole_by_every_worker_is_warned_about(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.warns(RuntimeWarning, match=r"get_worker_info\(\)"):
        s = actstore.precompute(model, Items(16, shard=False), tmp_path / "s", layers=["0"], batch_size=4,
                                num_workers=2, progress=False)
    assert len(s) == 16 and len(s.view("dataset")) == 32  # computed once each; nothing sharded by actstore
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        t = actstore.precompute(model, Items(16, shard=True), tmp_path / "t", layers=["0"], batch_size=4,
                                num_workers=2, progress=False)
    assert len(t) == 16 and len(t.view("dataset")) == 16
