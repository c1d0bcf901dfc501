"""A gather across segments through one map of their files side by side (engine/read/joined.py), and store[i]'s
one-frame path: the same rows and errors as the general paths."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actstore
from actstore import Field
from actstore.engine.read import joined as joined_module
from actstore.engine.read.joined import Joined, join
from actstore.training.datasets import ActivationDataset

FIELDS = {"h": Field((3,), "float16"), "b": Field((2,), "bfloat16"), "k": Field((), "int64"),
          "w": Field((5,), "float32")}
SIZES = (7, 1, 300, 44, 5)


def _values(lo: int, hi: int) -> dict[str, object]:
    r = np.arange(lo, hi)
    return {"h": (r[:, None] * 3 + np.arange(3)).astype(np.float16), "b": torch.tensor(r[:, None] * 2 + np.arange(2)).to(torch.bfloat16),
            "k": r, "w": (r[:, None] * 0.5 + np.arange(5)).astype(np.float32)}


def _store(path: Path, sizes: tuple[int, ...] = SIZES, fields: dict[str, Field] | None = None) -> actstore.ActivationStore:
    with actstore.create(path, fields or FIELDS) as w:
        w.merge_policy = None
        lo = 0
        for n in sizes:
            vals = _values(lo, lo + n)
            w.append([actstore.key(i) for i in range(lo, lo + n)], {k: v for k, v in vals.items() if k in w.fields})
            w.commit()
            lo += n
    return actstore.open(path)


def _maps() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[0] for line in f}


def test_a_gather_across_segments_is_one_take_from_one_map(tmp_path: Path) -> None:
    s = _store(tmp_path / "s")
    n = sum(SIZES)
    assert len(s.manifest.segments) == len(SIZES)
    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, n, 200), np.arange(n)[::-1], np.array([n - 1, 0, 7, 7, 8]), np.array([3])):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        got = s.gather(rows)
        joined = s.snapshot.plans["joined"]
        assert joined is not None and sorted(name for name, _, _ in joined) == sorted(FIELDS)
        for name in FIELDS:
            want = torch.stack([s[r][name] for r in rows.tolist()])  # row by row, each from its own segment's map
            assert got[name].dtype == want.dtype and got[name].shape == want.shape
            assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name  # type: ignore[union-attr]
        assert got["k"].tolist() == rows.tolist()  # type: ignore[union-attr]
    assert s.gather(np.empty(0, np.int64))["w"].shape == (0, 5)  # type: ignore[union-attr]


def test_rows_outside_the_store_are_refused_or_counted_from_the_end(tmp_path: Path) -> None:
    s = _store(tmp_path / "s")
    n = sum(SIZES)
    s.gather(np.array([1, 2], np.int64))
    assert s.snapshot.plans["joined"] is not None
    assert s.gather(np.array([-1, 0, -n], np.int64))["k"].tolist() == [n - 1, 0, 0]  # type: ignore[union-attr]
    for bad in (n, n + 10**6, -n - 1, 2**40, 2**62, 2**63 - 1, -(2**62) - 5, -(2**63)):  # (the sums wrap past int64)
        with pytest.raises(IndexError, match=f"row {bad} is out of range for a store of {n} rows"):
            s.gather(np.array([0, bad], np.int64))
        with pytest.raises(IndexError, match=f"row {bad} is out of range for a store of {n} rows"):
            s[bad]  # the row asked for is named, not the row it counts to from the end
    with pytest.raises(ValueError, match=r"1-D sequence .* shape \(2, 2\)"):
        s.gather(np.array([[0, 1], [2, 3]]))  # not flattened silently


def test_the_joined_map_is_unmapped_with_its_last_array(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", (3, 4))
    arrays = [seg.fixed("w") for seg in s.snapshot.segments]
    one = join(arrays, s.snapshot.starts_list)
    assert isinstance(one, Joined)
    assert one.take(np.arange(7)).tolist() == np.concatenate(arrays).tolist()
    lo = one.array.__array_interface__["data"][0]
    hi = lo + one.array.strides[0] * len(one.array)

    def inside() -> set[str]:  # the process's maps that overlap the joined range (other maps come and go)
        return {r for r in _maps() if int(r.split("-")[0], 16) < hi and int(r.split("-")[1], 16) > lo}

    assert inside()  # the reserved range and the files in it
    del one
    gc.collect()
    assert not inside()


def test_store_getitem_one_frame_path_keeps_every_check(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", (6,), {"w": FIELDS["w"]})
    assert s[2]["w"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert s.snapshot.row1 is not None  # one plain fixed field in one segment: store[i] reads its map inline
    assert torch.equal(s[-1]["w"], s[5]["w"]) and torch.equal(s[np.int64(3)]["w"], s[3]["w"])
    with pytest.raises(IndexError, match="row 6 is out of range for a store of 6 rows"):
        s[6]
    with pytest.raises(IndexError, match="row -7 is out of range"):
        s[-7]
    for bad in (True, 1.0, slice(0, 2), [1, 2]):
        with pytest.raises(TypeError, match="expected an int"):
            s[bad]  # type: ignore[index]
    ds = ActivationDataset(s)
    assert torch.equal(ds[4]["w"], s[4]["w"]) and torch.equal(ds[-2]["w"], s[4]["w"])
    with pytest.raises(IndexError, match="index 6 is out of range"):
        ds[6]
    s.close()
    with pytest.raises(actstore.StoreError):
        s[0]


def test_store_getitem_sees_a_refresh(tmp_path: Path) -> None:
    path = tmp_path / "s"
    r = _store(path, (4,), {"w": FIELDS["w"]})
    ds = ActivationDataset(r)
    assert r[3]["w"][0] == 1.5 and ds[3]["w"][0] == 1.5
    with actstore.open(path, mode="a") as w:
        w.merge_policy = None
        w.append([actstore.key(i) for i in range(4, 9)], {"w": _values(4, 9)["w"]})
    r.refresh()
    assert len(r) == 9 and r[8]["w"][0] == 4.0 and ds[8]["w"][0] == 4.0  # two segments now: the general path
    with actstore.open(path, mode="a") as w:
        w.compact()
    r.refresh()
    assert r[8]["w"][0] == 4.0 and ds[-1]["w"][0] == 4.0 and r.snapshot.row1 is not None


def test_a_row_size_with_a_large_odd_factor_reserves_little_address_space(tmp_path: Path) -> None:
    fields = {"p": Field((1009,), "float32")}  # 4,036-byte rows: a multiple of 2 MiB and of the row is 2 GiB
    with actstore.create(tmp_path / "s", fields) as w:
        w.merge_policy = None
        for lo, hi in ((0, 3), (3, 10)):
            w.append([actstore.key(i) for i in range(lo, hi)],
                     {"p": np.arange(lo * 1009, hi * 1009, dtype=np.float32).reshape(-1, 1009)})
            w.commit()
    s = actstore.open(tmp_path / "s")
    rows = np.array([9, 0, 3, 2], np.int64)
    assert s.gather(rows)["p"][:, 0].tolist() == [9 * 1009, 0, 3 * 1009, 2 * 1009]  # type: ignore[index]
    (name, one, _), = s.snapshot.plans["joined"]
    assert name == "p" and one.array.nbytes < (64 << 20) + 10 * 4036


def test_a_remote_store_maps_only_the_segments_a_gather_reads(tmp_path: Path) -> None:
    s = _store(tmp_path / "s")
    asked: list[str] = []
    for seg in s.snapshot.segments:  # a remote store's readers fetch each file into the chunk cache on first use
        seg.provide = lambda base, meta, names: asked.append(base)
    got = s.gather(np.array([0, 3, 6], np.int64))  # rows of the first segment only
    assert s.snapshot.plans["joined"] is None and got["k"].tolist() == [0, 3, 6]  # type: ignore[union-attr]
    assert set(asked) == {s.snapshot.segments[0].path}
    rows = np.array([n - 1 for n in np.cumsum(SIZES)], np.int64)
    assert s.gather(rows)["k"].tolist() == rows.tolist()  # type: ignore[union-attr]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 40), min_size=2, max_size=6), st.sampled_from([1, 3, 1009]),
       st.sampled_from([1, 2, 3, 1 << 15]), st.sampled_from([1, 4096, 1 << 20]))
def test_rows_in_blocks_across_boundaries_are_read_from_their_copies(tmp_path_factory: pytest.TempPathFactory,
                                                                    sizes: list[int], dim: int, max_blocks: int,
                                                                    max_copy: int) -> None:
    # Few blocks (large ones) put most boundaries, and often the last row, inside a block that is copied.
    path = tmp_path_factory.mktemp("j") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(joined_module, "_MAX_BLOCKS", max_blocks)
        mp.setattr(joined_module, "_MAX_COPY", max_copy)
        n = sum(sizes)
        rows = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
        with actstore.create(path, {"p": Field((dim,), "float32")}) as w:
            w.merge_policy = None
            lo = 0
            for m in sizes:
                w.append([actstore.key(i) for i in range(lo, lo + m)], {"p": rows[lo : lo + m]})
                w.commit()
                lo += m
        s = actstore.open(path)
        order = np.random.default_rng(n).permutation(n)
        assert s.gather(order)["p"].numpy().tolist() == rows[order].tolist()
        plan = s.snapshot.plans["joined"]
        assert plan is not None
        one = plan[0][1]
        assert one.table.shape[0] <= max(max_blocks, -(-n // 2))
        block = 1 << int(one.bits)
        for bad in (n, n + 1, -(-n // block) * block, -(-n // block) * block + 1, -1, -n - 1, -(2**63)):
            with pytest.raises(IndexError):
                one.take(np.array([0, bad], np.int64))
        s.close()


def test_copied_blocks_hold_the_files_bytes_whatever_was_written_into_a_row_view(tmp_path: Path) -> None:
    # store[i]'s views are copy-on-write: a write changes this process's page, never the file.  The joined map
    # reads the files; so must the blocks it copies (rows 4 and 5 straddle the boundary with 2-row blocks),
    # so that a batch's values do not depend on which block a row falls in.
    s = _store(tmp_path / "s", (5, 5), {"w": FIELDS["w"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(joined_module, "_MAX_BLOCKS", 5)
        for r in (2, 3, 4, 5):
            s[r]["w"][0] = -99.0
        got = s.gather(np.array([2, 3, 4, 5], np.int64))["w"][:, 0].tolist()  # type: ignore[index]
        one = s.snapshot.plans["joined"][0][1]
        assert int(one.bits) == 1 and got == [1.0, 1.5, 2.0, 2.5]


def test_a_join_whose_rows_do_not_start_at_zero_is_not_made(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", (5, 2), {"w": FIELDS["w"]})
    arrays = [seg.fixed("w") for seg in s.snapshot.segments]
    assert join(arrays, [3, 8, 10]) is None  # (its first rows would have no file: a take there must not happen)
    assert join(arrays, [0, 5, 7]) is not None
