"""``store[i]``'s inlined paths: several segments of one plain fixed field (bisection over the segment starts), and
the rows they build (plain dicts, or a per-snapshot ``Row`` class where the store has aliases): the same rows,
errors and types as the general path."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore import Field
from actstore.engine.read.base import Row
from actstore.errors import StoreError
from actstore.training.collate import RowDict
from actstore.training.datasets import ActivationDataset

SIZES = (7, 1, 300, 44, 5)


def _store(path: Path, sizes: tuple[int, ...] = SIZES) -> actstore.ActivationStore:
    with actstore.create(path, {"w": Field((2, 3), "float32")}) as w:
        w.merge_policy = None
        lo = 0
        for n in sizes:
            r = np.arange(lo, lo + n, dtype=np.float32)
            w.append([actstore.key(i) for i in range(lo, lo + n)], {"w": r[:, None, None] + np.zeros((n, 2, 3))})
            w.commit()
            lo += n
    return actstore.open(path)


def test_store_getitem_across_segments_keeps_every_check(tmp_path: Path) -> None:
    s = _store(tmp_path / "s")
    n = sum(SIZES)
    assert len(s.manifest.segments) == len(SIZES)
    s[0]  # (builds the snapshot's paths)
    assert s.snapshot.rowk is not None and s.snapshot.row1 is None  # several segments: the bisection path
    for r in [*range(n), *range(-n, 0)]:
        got = s[r]
        assert list(got) == ["w"] and got["w"].shape == (2, 3) and got["w"].dtype == torch.float32
        assert torch.equal(got["w"], torch.full((2, 3), float(r % n))), r
        assert torch.equal(got["w"], s.gather(np.array([r % n]))["w"][0])  # type: ignore[index]
    seg = s.snapshot.segments[2]
    assert s[8]["w"].data_ptr() == torch.from_numpy(seg.fixed("w")[0]).data_ptr()  # a view of its segment's map
    assert torch.equal(s[np.int64(9)]["w"], s[9]["w"])
    for bad in (n, n + 1, 10**12, -n - 1, -10**12):
        with pytest.raises(IndexError, match=f"row {bad} is out of range for a store of {n} rows"):
            s[bad]
    for bad in (True, 1.0, slice(0, 2), [1, 2], (1,), np.array(3)):
        with pytest.raises(TypeError, match="expected an int"):
            s[bad]  # type: ignore[index]
    ds = ActivationDataset(s)
    assert torch.equal(ds[n - 1]["w"], s[-1]["w"]) and torch.equal(ds[-n]["w"], s[0]["w"])
    with pytest.raises(IndexError, match=f"out of range for a store of {n} rows"):
        ds[n]
    assert type(s[3]) is dict  # (no aliases: a plain dict, whose KeyError names the key)
    with pytest.raises(KeyError, match="'x'"):
        s[3]["x"]
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s[3]
    with pytest.raises(StoreError, match="closed"):
        ds[3]


def test_store_getitem_across_segments_sees_a_dropped_map(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", (3, 4))
    s[0]
    assert s.snapshot.rowk is not None
    s.snapshot.forget(s.manifest.segments[1].id, ["w"])  # (what an evicted cache file does)
    assert s.snapshot.rowk is None
    assert s[5]["w"][0, 0] == 5.0 and s.snapshot.rowk is not None  # rebuilt on the next general call


def test_a_missing_segment_file_keeps_the_other_segments_readable(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", (3, 4, 5))
    seg = s.manifest.segments[1].id
    (tmp_path / "s" / "segments" / seg / "fields" / "w" / "c" / "0" / "0" / "0").unlink()
    assert s[0]["w"][0, 0] == 0.0 and s[11]["w"][0, 0] == 11.0  # rows of the intact segments
    assert s.snapshot.rowk is None  # not every segment maps: the general path, segment by segment
    with pytest.raises(StoreError):
        s[4]  # the damaged segment's rows: an error naming its file
    checked = actstore.open(tmp_path / "s", verify_reads=True)
    assert checked[12 - 1]["w"][0, 0] == 11.0 and checked.snapshot.rowk is None  # (no fast path: no eager checks)


def test_fast_path_rows_are_rows_of_the_snapshots_row_class(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    data = [torch.randn(3) for _ in range(6)]
    store = actstore.precompute(model, data, tmp_path / "s", layers={"0": "hidden"}, progress=False)
    assert list(store.fields) == ["hidden"] and len(store.manifest.segments) == 1
    store[0]
    assert store.snapshot.row1 is not None  # one plain fixed field in one segment: the inlined path
    row = store[1]
    assert type(row) is store.snapshot.row_type and isinstance(row, Row) and isinstance(row, dict)
    assert row.aliases == {"0": "hidden"} and list(row) == ["hidden"] and len(row) == 1
    assert row["0"] is row["hidden"]  # the layer's module name finds its field
    with pytest.raises(KeyError, match=r"no field '1' in this row; its fields are \['hidden'\]"):
        row["1"]
    for again in (pickle.loads(pickle.dumps(row)), copy.copy(row), copy.deepcopy(row)):
        assert type(again) is Row and again.aliases == {"0": "hidden"} and list(again) == ["hidden"]
        assert torch.equal(again["0"], row["hidden"])
    ds = ActivationDataset(store)
    item = ds[1]
    assert type(item) is store.snapshot.row_type and torch.equal(item["0"], row["hidden"])
    assert isinstance(ds.__getitems__([0, 1])[1], RowDict)  # a batch's items are marked for actstore's collate
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert type(batch) is dict and batch["hidden"].shape == (4, 4)
    assert torch.equal(batch["hidden"][1], row["hidden"])
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store[1]


@pytest.mark.parametrize("sizes", [(9,), (4, 5)])
@pytest.mark.parametrize("extra", [False, True])
def test_rows_of_a_store_without_aliases_are_plain_dicts_on_every_path(tmp_path: Path, sizes: tuple[int, ...],
                                                                       extra: bool) -> None:
    fields = {"w": Field((2, 3), "float32")} | ({"n": Field((), "int64")} if extra else {})
    with actstore.create(tmp_path / "s", fields) as w:
        w.merge_policy = None
        lo = 0
        for n in sizes:
            vals = {"w": np.arange(lo, lo + n, dtype=np.float32)[:, None, None] + np.zeros((n, 2, 3), np.float32)}
            if extra:
                vals["n"] = np.arange(lo, lo + n)
            w.append([actstore.key(i) for i in range(lo, lo + n)], vals)
            w.commit()
            lo += n
    s = actstore.open(tmp_path / "s")
    assert s.snapshot.aliases == {} and s.snapshot.row_type is dict
    ds, sub = ActivationDataset(s), ActivationDataset(s, "w")
    for i in (0, 3, 8, -1):  # (the first call builds the inlined paths: the general path, then theirs)
        for row in (s[i], s[i], ds[i], ds[i], sub[i]):
            assert type(row) is dict and float(row["w"][0, 0]) == float(i % 9)
    assert [type(r) for r in s.iter_rows()] == [dict] * 9
    again = pickle.loads(pickle.dumps(s[2]))
    assert type(again) is dict and torch.equal(again["w"], s[2]["w"])
    with pytest.raises(KeyError, match="'nope'"):
        s[1]["nope"]
