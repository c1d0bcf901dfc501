"""The read plans behind ``store[i]`` and a one-segment ``store.gather``: the same answers as the general path.

Every field kind is read both ways (through the plan and through ``row_view`` /
the general gather) and compared bit for bit; plain fields stay views of the
maps, and anything that is not a plain map keeps the general path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from blake3 import blake3

import actstore
from actstore import Field, RaggedBatch
from actstore.engine.read.gather import gather_fixed, row_view
from actstore.engine.read.plans import ROW_ALL, plain, row_plan, take_plan

FIELDS = {
    "x": Field((3,), "float32"),
    "n": Field((), "int16"),
    "b": Field((2,), "bfloat16"),
    "m": Field((2, 2), "uint8"),
    "t": Field((None, 2), "float16"),
    "tb": Field((None,), "bfloat16"),
    "z": Field((4,), "float32", compression="zstd"),
    "zt": Field((None, 3), "int32", compression="zstd"),
}


def keys(n: int, start: int = 0) -> list[bytes]:
    return [blake3(b"p%d" % i).digest() for i in range(start, start + n)]


def values(n: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 4, n)
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "n": rng.integers(-999, 999, n).astype(np.int16),
        "b": torch.randn(n, 2).to(torch.bfloat16),
        "m": rng.integers(0, 255, (n, 2, 2)).astype(np.uint8),
        "t": [rng.standard_normal((k, 2)).astype(np.float16) for k in lens],
        "tb": [torch.randn(int(k)).to(torch.bfloat16) for k in lens],
        "z": rng.standard_normal((n, 4)).astype(np.float32),
        "zt": [rng.integers(-5, 5, (k, 3)).astype(np.int32) for k in lens],
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.fixture
def store(tmp_path: Path) -> actstore.ActivationStore:
    with actstore.create(tmp_path / "s", FIELDS) as w:
        w.merge_policy = None
        for c, n in enumerate((5, 1, 4)):
            w.append(keys(n, 10 * c), values(n, c))
            w.commit()
    return actstore.open(tmp_path / "s")


def test_plain_is_raw_values_and_nothing_else() -> None:
    assert plain(Field((3,), "float16")) and plain(Field((None, 4), "bfloat16")) and plain(Field((), "bool"))
    assert not plain(Field((3,), "float16", compression="zstd"))

    @dataclasses.dataclass(frozen=True, eq=True, init=False)
    class Marked(Field):  # a field carrying an attribute the fast paths do not know
        pass

    assert not plain(Marked((3,), "float16"))


def test_rows_through_the_plan_are_the_general_rows(store: actstore.ActivationStore) -> None:
    snap = store.snapshot
    for row in range(len(store)):
        got = store[row]
        seg, local = snap.locate(row)
        assert type(got) is dict and list(got) == list(store.fields)  # (no aliases: a plain dict)
        for name, f in FIELDS.items():
            want = row_view(seg, local, name, f)
            assert same(got[name], want), (row, name)
    assert same(store[-1]["t"], store[len(store) - 1]["t"])
    assert same(store[np.int64(2)]["x"], store[2]["x"])
    for bad in (len(store), -len(store) - 1):
        with pytest.raises(IndexError, match="out of range"):
            store[bad]
    with pytest.raises(TypeError):
        store[True]  # type: ignore[index]
    with pytest.raises(KeyError, match="'nope'"):
        store[0]["nope"]


def test_plain_fields_are_views_and_others_keep_the_general_path(store: actstore.ActivationStore) -> None:
    seg = store.snapshot.segments[0]
    row = store[1]
    assert row["x"].data_ptr() == torch.from_numpy(seg.fixed("x")[1]).data_ptr()
    values_, offsets = seg.ragged("t")
    assert row["t"].data_ptr() == torch.from_numpy(values_[offsets[1] :]).data_ptr()
    assert row["b"].dtype == torch.bfloat16 and row["tb"].dtype == torch.bfloat16
    assert row["n"].shape == () and row["m"].shape == (2, 2)
    assert store[1]["z"].data_ptr() != store[1]["z"].data_ptr()  # compressed: decoded afresh, a copy
    assert seg.plans.get(ROW_ALL) is row_plan(seg)  # built once
    assert take_plan(seg) is None  # ragged and compressed fields: the general gather


def test_forgetting_maps_drops_plans(store: actstore.ActivationStore) -> None:
    seg = store.snapshot.segments[0]
    store[0]
    assert seg.plans
    seg.forget(["x"])
    assert not seg.plans and "x" not in seg.arrays
    assert same(store[0]["x"], row_view(seg, 0, "x", FIELDS["x"]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64"])
def test_one_segment_gather_fast_path(tmp_path: Path, dtype: str) -> None:
    fields = {"h": Field((4,), dtype), "k": Field((), "int32")}
    rng = np.random.default_rng(0)
    h = torch.from_numpy(rng.standard_normal((20, 4))).to(getattr(torch, dtype))
    with actstore.create(tmp_path / "s", fields) as w:
        w.append(keys(20), {"h": h, "k": np.arange(20, dtype=np.int32)})
    s = actstore.open(tmp_path / "s")
    seg = s.snapshot.segments[0]
    assert take_plan(seg) is not None
    rows = np.array([3, -1, 0, 19, 3], np.int64)
    got = s.gather(rows)
    for name, f in fields.items():
        want = gather_fixed(s.snapshot, name, f, s.snapshot.check_rows(rows))
        assert same(got[name], want)  # type: ignore[arg-type]
    assert got["k"].tolist() == [3, 19, 0, 19, 3]  # type: ignore[union-attr]
    assert torch.from_numpy(seg.fixed("h")).data_ptr() != got["h"].data_ptr()  # type: ignore[union-attr]
    assert same(s.gather(rows.astype(np.int32))["h"], got["h"])  # type: ignore[arg-type]  # (the general path)
    assert s.gather(np.empty(0, np.int64))["h"].shape == (0, 4)  # type: ignore[union-attr]
    for bad in (20, -21):
        with pytest.raises(IndexError, match=f"row {bad} is out of range for a store of 20 rows"):
            s.gather(np.array([0, bad], np.int64))
    s.close()
    with pytest.raises(actstore.StoreError, match="closed"):
        s.gather(rows)


def test_gather_of_ragged_and_compressed_fields_is_unchanged(store: actstore.ActivationStore) -> None:
    rows = np.array([0, 9, 5, 2], np.int64)
    out = store.gather(rows)
    for i, r in enumerate(rows.tolist()):
        row = store[r]
        for name, f in FIELDS.items():
            got = out[name]
            part = got[i] if isinstance(got, RaggedBatch) else got[i]
            assert same(part, row[name]), (r, name)
            assert isinstance(got, RaggedBatch) == f.ragged


def test_gather_across_segments_fast_path(tmp_path: Path) -> None:
    fields = {"h": Field((3,), "bfloat16"), "k": Field((), "int64")}
    with actstore.create(tmp_path / "s", fields) as w:
        w.merge_policy = None
        for lo, hi in ((0, 4), (4, 5), (5, 12), (12, 20)):
            w.append(keys(hi - lo, lo), {"h": torch.arange(3 * lo, 3 * hi).reshape(-1, 3).to(torch.bfloat16),
                                         "k": np.arange(lo, hi)})
            w.commit()
    s = actstore.open(tmp_path / "s")
    assert len(s.manifest.segments) == 4
    rng = np.random.default_rng(3)
    for rows in [rng.integers(0, 20, 50), np.array([19, 0, 4, 4, 11]), np.array([5, 6, 7]), np.arange(20)[::-1]]:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        got = s.gather(rows)
        assert got["k"].tolist() == rows.tolist()  # type: ignore[union-attr]
        want = gather_fixed(s.snapshot, "h", fields["h"], rows)
        assert same(got["h"], want)  # type: ignore[arg-type]
    assert s.snapshot.plans.get("joined") or "across" in s.snapshot.plans
    assert s.gather(np.array([-1, 0], np.int64))["k"].tolist() == [19, 0]  # type: ignore[union-attr]  # (general path)
    with pytest.raises(IndexError, match="row 20 is out of range"):
        s.gather(np.array([3, 20], np.int64))
    assert s.gather(np.empty(0, np.int64))["h"].shape == (0, 3)  # type: ignore[union-attr]
    seg = s.snapshot.segments[2]
    s.snapshot.forget(seg.info.id, ["h"])  # (what the chunk cache's eviction does)
    assert not s.snapshot.plans and "h" not in seg.arrays
    assert s.gather(np.array([6, 13], np.int64))["k"].tolist() == [6, 13]  # type: ignore[union-attr]


def test_gather_across_segments_with_a_ragged_field_is_the_general_path(store: actstore.ActivationStore) -> None:
    rows = np.array([9, 0, 5], np.int64)
    got = store.gather(rows)
    assert store.snapshot.plans.get("across", None) is None
    assert isinstance(got["t"], RaggedBatch) and same(got["x"], torch.stack([store[r]["x"] for r in rows.tolist()]))  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [{"h": Field((4,), "float16")}, {"h": Field((4,), "float16"), "y": Field((), "int64")},
                                    {"h": Field((4,), "bfloat16")}, {"h": Field((4,), "float16", quantize="int8")}])
def test_one_segment_row_getter_is_store_getitem(tmp_path: Path, fields: dict[str, Field]) -> None:
    """``store[i]`` of a one-segment store (one closure per snapshot): the general rows, negative rows, the errors."""
    rng = np.random.default_rng(0)
    vals = {n: rng.standard_normal((5, *f.shape)).astype(np.float32) if f.shape else np.arange(5) for n, f in fields.items()}
    with actstore.create(tmp_path / "s", fields) as s:
        s.append(keys(5), vals)
        s.commit()
    s = actstore.open(tmp_path / "s")
    seg = s.snapshot.segments[0]
    for i in range(-5, 5):
        got = s[i]
        assert type(got) is dict and list(got) == list(fields)
        for n, f in fields.items():
            assert torch.equal(got[n], row_view(seg, i % 5, n, f))
    with pytest.raises(IndexError, match="row 5 is out of range for a store of 5 rows"):
        s[5]
    with pytest.raises(IndexError, match="row -6 is out of range"):
        s[-6]
    with pytest.raises(KeyError, match="'nope'"):
        s[0]["nope"]
    s.snapshot.forget(seg.info.id, list(fields))  # plans (the getter too) are dropped with the maps
    assert "getitem" not in s.snapshot.plans
    assert torch.equal(s[1]["h"], row_view(seg, 1, "h", fields["h"]))
