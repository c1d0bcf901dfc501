"""Tests for the activation store API: create/open, append, commit, read, lock, verify, interop.

Every test works in ``tmp_path`` and checks the store's observable behaviour
(what a reader sees, what is on disk), so each can fail if that behaviour breaks.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from blake3 import blake3
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import actstore
from actstore import (
    CorruptStoreError,
    Field,
    RaggedBatch,
    StaleStoreError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from actstore.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ["float32", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"]
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --- helpers ----------------------------------------------------------------------


def mkkeys(n: int, start: int = 0, tag: bytes = b"k") -> list[bytes]:
    """``n`` distinct, deterministic 32-byte keys."""
    return [blake3(tag + b"%d" % i).digest() for i in range(start, start + n)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of ``t`` (so NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().view(BITS[t.element_size()])


def dense(x: torch.Tensor | RaggedBatch) -> torch.Tensor:
    """A fixed field's gather result (a tensor, not a RaggedBatch)."""
    assert isinstance(x, torch.Tensor)
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def sample(dtype: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values of ``dtype`` that include the edge cases (extremes, NaN, ±inf, -0.0, subnormals)."""
    g = torch.Generator().manual_seed(seed)
    t = TORCH_DTYPES[dtype]
    if t == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if t.is_floating_point:
        x = (torch.randn(shape, generator=g) * 100).to(t)
        fi = torch.finfo(t)
        specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), fi.max, fi.min, fi.tiny, fi.smallest_normal / 4]
        flat = x.view(-1)
        k = min(len(flat), len(specials))
        flat[:k] = torch.tensor(specials[:k], dtype=torch.float32).to(t)
        return x
    ii = torch.iinfo(t)
    x = torch.randint(ii.min, ii.max, shape, generator=g, dtype=t)
    flat = x.view(-1)
    flat[: min(2, len(flat))] = torch.tensor([ii.min, ii.max][: min(2, len(flat))], dtype=t)
    return x


def shard_path(store: actstore.ActivationStore, segment: int, rel: str) -> Path:
    """Path of a file inside a committed segment, e.g. ``fields/x/c/0/0``."""
    return Path(store.path) / "segments" / store.manifest.segments[segment].id / rel


def state(store: actstore.ActivationStore, probe: list[bytes]) -> tuple[Any, ...]:
    """What a caller can observe of a store (used to check that failed calls change nothing)."""
    return (len(store), store.pending, store.generation, tuple(store.lookup(probe).tolist()))


BASIC = {"x": Field((3,), "float32"), "n": Field((), "int16"), "t": Field((None, 2), "float16")}


def basic_values(n: int, seed: int = 0, lengths: list[int] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    lengths = lengths if lengths is not None else [int(v) for v in rng.integers(0, 4, n)]
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "n": rng.integers(-1000, 1000, n).astype(np.int16),
        "t": [rng.standard_normal((k, 2)).astype(np.float16) for k in lengths],
    }


@pytest.fixture
def basic(tmp_path: Path) -> Iterator[actstore.ActivationStore]:
    store = actstore.create(tmp_path / "s", BASIC)
    yield store
    store.close()


# --- Field ------------------------------------------------------------------------


def test_field_normalises_shape_and_dtype() -> None:
    assert Field(4).shape == (4,)
    assert Field(None).ragged and Field(None).inner_shape == ()
    assert Field((None, 3), "float16").inner_shape == (3,) and Field((None, 3)).ragged
    assert Field((), "int64").row_bytes == 8 and not Field(()).ragged
    assert Field((2, 3), np.float16).dtype == "float16"
    assert Field((2,), torch.bfloat16).dtype == "bfloat16"
    assert Field((2,), np.dtype(">i4")).dtype == "int32"  # stored little-endian whatever the input order
    assert Field((np.int64(5),)).shape == (5,) and type(Field((np.int64(5),)).shape[0]) is int
    assert Field((2, 3)) == Field([2, 3], "float32")


@pytest.mark.parametrize(
    "shape", [(0,), (-1,), (2.5,), (True,), (3, None), (None, None), "ab", (1,) * 9, (2**40 + 1,)]
)
def test_field_refuses_bad_shapes(shape: Any) -> None:
    with pytest.raises(ValueError, match="shape"):
        Field(shape)


def test_field_refuses_non_sequence_shape() -> None:
    with pytest.raises(TypeError, match="shape"):
        Field(object())


@pytest.mark.parametrize("dtype", ["float64", "complex64", "nonsense", np.float64, np.uint16, torch.float64, torch.complex64, 3])
def test_field_refuses_bad_dtypes(dtype: Any) -> None:
    with pytest.raises(TypeError, match="dtype"):
        Field((2,), dtype)


# --- create / open ------------------------------------------------------------------


def test_create_and_open(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with actstore.create(path, BASIC, fingerprint="fp", attrs={"a": 1}) as w:
        assert len(w) == 0 and w.pending == 0 and w.generation == 0 and w.mode == "a"
        assert dict(w.fields) == BASIC
        assert "rows=0" in repr(w)
    r = actstore.open(path)
    assert r.mode == "r" and len(r) == 0 and dict(r.fields) == BASIC and r.fingerprint == "fp"
    assert r.path == str(path)
    with pytest.raises(StoreError, match="read-only"):
        r.append(mkkeys(1), basic_values(1))
    r.close()
    with pytest.raises(StoreError, match="closed"):
        r.lookup(mkkeys(1))


def test_create_refuses_existing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    actstore.create(path, BASIC).close()
    with pytest.raises(StoreExistsError):
        actstore.create(path, BASIC)
    with pytest.raises(FileExistsError):  # builtin parent still catches it
        actstore.create(path, BASIC)
    with pytest.raises(StoreExistsError, match="other fields"):
        actstore.create(path, {"y": Field(2)}, exist_ok=True)
    with actstore.create(path, BASIC, exist_ok=True) as again:
        assert again.mode == "a"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="not an empty directory"):
        actstore.create(tmp_path / "busy", BASIC)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreExistsError):
        actstore.create(tmp_path / "file", BASIC)


def test_create_never_overwrites_a_store_created_concurrently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process creates (and fills) the store between create()'s check and its taking the lock."""
    import actstore.storage.local

    real = actstore.storage.local.StoreLock

    def racing(root: str) -> Any:
        monkeypatch.setattr(actstore.storage.local, "StoreLock", real)
        with actstore.create(root, BASIC) as other:
            other.append(mkkeys(2), basic_values(2))
        return real(root)

    monkeypatch.setattr(actstore.storage.local, "StoreLock", racing)
    with pytest.raises(StoreExistsError):
        actstore.create(tmp_path / "a", BASIC)
    assert len(actstore.open(tmp_path / "a")) == 2
    monkeypatch.setattr(actstore.storage.local, "StoreLock", racing)
    with actstore.create(tmp_path / "b", BASIC, exist_ok=True) as again:
        assert len(again) == 2
    assert len(actstore.open(tmp_path / "b")) == 2


@pytest.mark.parametrize("name", ["", "a/b", ".x", "-x", "..", "a b", "zarr.json", "ZARR.JSON", "__x", "x" * 129, 3])
def test_create_refuses_bad_field_names(tmp_path: Path, name: Any) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        actstore.create(tmp_path / "s", {name: Field(2)})
    assert not (tmp_path / "s" / "zarr.json").exists()


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fields"):
        actstore.create(tmp_path / "s", {})
    with pytest.raises(TypeError, match="actstore.Field"):
        actstore.create(tmp_path / "s", {"x": (3,)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="chunk_bytes"):
        actstore.create(tmp_path / "s", BASIC, chunk_bytes=0)
    with pytest.raises(TypeError, match="fingerprint"):
        actstore.create(tmp_path / "s", BASIC, fingerprint=123)  # type: ignore[arg-type]
    for bad in ({"o": object()}, {"nan": float("nan")}):
        with pytest.raises(TypeError, match="attrs"):
            actstore.create(tmp_path / "s", BASIC, attrs=bad)
    assert not (tmp_path / "s" / "zarr.json").exists()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        actstore.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        actstore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="zarr.json"):
        actstore.open(tmp_path / "empty")
    actstore.create(tmp_path / "s", BASIC).close()
    with pytest.raises(ValueError, match="mode"):
        actstore.open(tmp_path / "s", mode="w")


def test_fingerprint_and_attrs(tmp_path: Path) -> None:
    attrs = {"model": "m", "layers": [1, 2], "nested": {"k": None, "f": 0.5, "b": True}}
    actstore.create(tmp_path / "s", BASIC, fingerprint="abc", attrs=attrs).close()
    s = actstore.open(tmp_path / "s", fingerprint="abc")
    assert s.fingerprint == "abc" and dict(s.attrs) == attrs and s.info()["attrs"] == attrs
    with pytest.raises(StaleStoreError, match="recompute"):
        actstore.open(tmp_path / "s", fingerprint="other")
    with pytest.raises(ValueError):  # builtin parent
        actstore.open(tmp_path / "s", mode="a", fingerprint="other")
    with pytest.raises(StaleStoreError):
        actstore.create(tmp_path / "s", BASIC, fingerprint="other", exist_ok=True)
    # the refused writers released the lock
    actstore.open(tmp_path / "s", mode="a").close()


# --- dtypes and shapes round-trip exactly ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (3,), (2, 2)])
def test_fixed_dtypes_round_trip_exactly(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    n = 7
    values = sample(dtype, (n, *shape), seed=len(shape))
    with actstore.create(tmp_path / "s", {"v": Field(shape, dtype)}, chunk_bytes=16) as w:
        assert w.append(mkkeys(n), {"v": values}) == n
    s = actstore.open(tmp_path / "s")
    want_dtype = TORCH_DTYPES[dtype]
    for i in range(n):
        got = s[i]["v"]
        assert got.dtype == want_dtype and got.shape == shape
        assert same_bits(got, values[i])
    batch = s.gather(np.arange(n)[::-1])["v"]
    assert isinstance(batch, torch.Tensor) and same_bits(batch, values.flip(0))
    assert same_bits(s.get(mkkeys(n)[3])["v"], values[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_dtypes_round_trip_exactly(tmp_path: Path, dtype: str) -> None:
    lengths = [0, 3, 1, 0, 5, 0]
    flat = sample(dtype, (sum(lengths), 2), seed=1)
    rows = list(torch.split(flat, lengths))
    with actstore.create(tmp_path / "s", {"v": Field((None, 2), dtype)}, chunk_bytes=8) as w:
        assert w.append(mkkeys(len(rows)), {"v": rows}) == len(rows)
    s = actstore.open(tmp_path / "s")
    for i, row in enumerate(rows):
        got = s[i]["v"]
        assert got.shape == (lengths[i], 2) and same_bits(got, row)
    order = [4, 0, 1, 3, 5, 2, 4]
    rb = s.gather(order)["v"]
    assert isinstance(rb, RaggedBatch) and len(rb) == len(order)
    assert rb.lengths.tolist() == [lengths[i] for i in order]
    for j, i in enumerate(order):
        assert same_bits(rb[j], rows[i])
    assert s.verify().ok


def test_ragged_scalar_elements_and_ragged_batch_input(tmp_path: Path) -> None:
    rows = [torch.arange(k, dtype=torch.int64) for k in (2, 0, 4)]
    with actstore.create(tmp_path / "s", {"ids": Field(None, "int64")}) as w:
        assert w.append(mkkeys(3), {"ids": RaggedBatch.from_list(rows)}) == 3
        assert w.append(mkkeys(2, 3), {"ids": [[7], []]}) == 2
    s = actstore.open(tmp_path / "s")
    assert [s[i]["ids"].tolist() for i in range(5)] == [[0, 1], [], [0, 1, 2, 3], [7], []]


def test_all_empty_ragged_segment(tmp_path: Path) -> None:
    """A segment whose ragged rows are all empty has a values array with no shard file."""
    with actstore.create(tmp_path / "s", BASIC) as w:
        w.append(mkkeys(2), basic_values(2, lengths=[0, 0]))
        w.commit()
        w.set_view("empty", [])
    s = actstore.open(tmp_path / "s")
    assert len(s) == 2 and s[1]["t"].shape == (0, 2)
    assert s.gather([0, 1])["t"].offsets.tolist() == [0, 0, 0]  # type: ignore[union-attr]
    assert s.view("empty").shape == (0,)
    assert not shard_path(s, 0, "fields/t/values/c/0/0").exists()
    assert s.verify().ok


# --- append ----------------------------------------------------------------------------


def test_append_counts_new_rows_and_skips_duplicates(basic: actstore.ActivationStore) -> None:
    k = mkkeys(6)
    v = basic_values(6, seed=1)
    assert basic.append(k[:2], {n: c[:2] for n, c in v.items()}) == 2
    basic.commit()
    # k0 committed, k2 pending after the first call, k3 repeated within the batch
    assert basic.append([k[2]], {"x": v["x"][2:3], "n": v["n"][2:3], "t": v["t"][2:3]}) == 1
    batch_keys = [k[0], k[2], k[3], k[3], k[4], k[3]]
    vals = basic_values(6, seed=2)
    assert basic.append(batch_keys, vals) == 2  # k3 (first occurrence) and k4
    assert basic.pending == 3 and len(basic) == 2
    assert basic.append([k[4], k[0]], basic_values(2, seed=3)) == 0
    assert basic.append([], {"x": np.zeros((0, 3)), "n": np.zeros(0, np.int16), "t": []}) == 0
    basic.commit()
    assert len(basic) == 5
    assert basic.lookup(k).tolist() == [0, 1, 2, 3, 4, -1]
    # the first occurrence's values were kept, later duplicates were ignored
    np.testing.assert_array_equal(basic[0]["x"].numpy(), v["x"][0])
    np.testing.assert_array_equal(basic[3]["x"].numpy(), vals["x"][2])
    np.testing.assert_array_equal(basic[3]["t"].numpy(), vals["t"][2])
    np.testing.assert_array_equal(basic[4]["t"].numpy(), vals["t"][4])


def _bad_batches() -> list[tuple[str, Any, Any, type[Exception]]]:
    k = mkkeys(3, 100)
    good = basic_values(3, seed=5, lengths=[1, 0, 2])
    cases: list[tuple[str, Any, Any, type[Exception]]] = []

    def with_(**over: Any) -> dict[str, Any]:
        return {**good, **over}

    cases.append(("fixed wrong shape", k, with_(x=np.zeros((3, 4), np.float32)), ValueError))
    cases.append(("fixed wrong rank", k, with_(x=np.zeros(3, np.float32)), ValueError))
    cases.append(("ragged wrong inner", k, with_(t=[np.zeros((1, 3))] * 3), ValueError))
    cases.append(("ragged as array", k, with_(t=np.zeros((3, 2, 2))), TypeError))
    cases.append(("ragged mixed dtypes", k, with_(t=[np.zeros((1, 2), np.float16), np.zeros((1, 2), np.float32), np.zeros((0, 2), np.float16)]), ValueError))
    cases.append(("missing field", k, {"x": good["x"], "n": good["n"]}, ValueError))
    cases.append(("extra field", k, with_(z=np.zeros(3)), ValueError))
    cases.append(("values not a dict", k, [good["x"]], TypeError))
    cases.append(("strings", k, with_(n=np.array(["a", "b", "c"])), TypeError))
    cases.append(("float into int", k, with_(n=np.array([1.0, 2.0, 3.0])), ValueError))
    cases.append(("bool into float", k, with_(x=np.ones((3, 3), bool)), ValueError))
    cases.append(("int overflow", k, with_(n=np.array([1, 2, 40000])), ValueError))
    cases.append(("int underflow", k, with_(n=torch.tensor([1, -40000, 2], dtype=torch.int32)), ValueError))
    cases.append(("uint32 overflow", k, with_(n=np.array([1, 2, 2**31], np.uint32)), ValueError))
    cases.append(("uint64 overflow", k, with_(n=np.array([1, 2, 2**63], np.uint64)), ValueError))
    cases.append(("key too short", [k[0], k[1], k[2][:31]], good, ValueError))
    cases.append(("key too long", [k[0], k[1], k[2] + b"!"], good, ValueError))
    cases.append(("key not bytes", [k[0], k[1], k[2].hex()], good, TypeError))
    cases.append(("keys a str", "abc", good, TypeError))
    cases.append(("key array shape", np.zeros((3, 31), np.uint8), good, ValueError))
    cases.append(("key array dtype", np.zeros((3, 32), np.int64), good, ValueError))
    cases.append(("more keys than rows", [*k, mkkeys(1, 200)[0]], good, ValueError))
    cases.append(("fewer keys than rows", k[:2], with_(t=good["t"][:2]), ValueError))
    cases.append(("ragged row count", k, with_(t=good["t"][:2]), ValueError))
    return cases


BAD = _bad_batches()


@pytest.mark.parametrize(("keys", "values", "error"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_append_is_all_or_nothing(basic: actstore.ActivationStore, keys: Any, values: Any, error: type[Exception]) -> None:
    basic.append(mkkeys(2), basic_values(2))
    basic.commit()
    basic.append(mkkeys(1, 2), basic_values(1))  # one pending row
    probe = mkkeys(3) + mkkeys(3, 100)
    before = state(basic, probe)
    with pytest.raises(error):
        basic.append(keys, values)
    assert state(basic, probe) == before
    basic.commit()
    assert len(basic) == 3 and basic.lookup(mkkeys(3, 100)).tolist() == [-1, -1, -1]
    assert basic.verify().ok


def test_nonfinite_policy(basic: actstore.ActivationStore) -> None:
    nan_payload = torch.tensor([0x7FC00001, 0xFF800000, 0x80000000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.stack([nan_payload, torch.zeros(3), torch.ones(3)])
    vals = {"x": x, "n": np.zeros(3, np.int16), "t": [np.zeros((0, 2))] * 3}
    before = state(basic, mkkeys(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        basic.append(mkkeys(3), vals, allow_nonfinite=False)
    inf_ragged = {**vals, "x": torch.zeros(3, 3), "t": [np.array([[np.inf, 0.0]], np.float16)] * 3}
    with pytest.raises(ValueError, match="NaN or infinite"):
        basic.append(mkkeys(3), inf_ragged, allow_nonfinite=False)
    assert state(basic, mkkeys(3)) == before
    assert basic.append(mkkeys(3), vals) == 3  # default: stored as they are
    basic.commit()
    assert same_bits(basic[0]["x"], nan_payload)  # NaN payload, -inf and -0.0 bit for bit
    assert basic.append(mkkeys(1, 3), {**vals, "x": torch.zeros(1, 3), "n": [1], "t": [np.zeros((1, 2))]},
                        allow_nonfinite=False) == 1


def test_casts_that_keep_meaning(basic: actstore.ActivationStore) -> None:
    vals = {
        "x": [[1, 2, 3]],  # int list -> float32
        "n": np.array([7], np.uint8),  # widening
        "t": [torch.tensor([[0.5, 1.5]], dtype=torch.float64)],  # float64 -> float16
    }
    assert basic.append(mkkeys(1), vals) == 1
    basic.commit()
    row = basic[0]
    assert row["x"].dtype == torch.float32 and row["x"].tolist() == [1.0, 2.0, 3.0]
    assert row["n"].dtype == torch.int16 and int(row["n"]) == 7
    assert row["t"].dtype == torch.float16 and row["t"].tolist() == [[0.5, 1.5]]


# --- commit, snapshots, abort ------------------------------------------------------------


def test_commit_and_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, BASIC)
    early = actstore.open(path)
    k = mkkeys(4)
    assert w.append(k[:3], basic_values(3)) == 3
    assert len(w) == 0 and w.pending == 3 and w.lookup(k[:1]).tolist() == [-1]
    assert len(actstore.open(path)) == 0  # nothing visible before the commit
    assert w.commit() == 1 and w.generation == 1 and w.pending == 0
    assert w.commit() == 1  # nothing pending: no new generation
    fresh = actstore.open(path)
    assert len(fresh) == 3 and fresh.lookup(k).tolist() == [0, 1, 2, -1]
    # the early reader keeps its snapshot until refresh()
    assert len(early) == 0 and early.lookup(k[:1]).tolist() == [-1]
    with pytest.raises(IndexError):
        early[0]
    assert early.refresh() is True and len(early) == 3 and early.lookup(k[:1]).tolist() == [0]
    assert early.refresh() is False
    w.append(k[3:], basic_values(1))
    w.close()  # close commits
    assert len(actstore.open(path)) == 4
    with actstore.open(path, mode="a") as w2:
        w2.append(mkkeys(2, 10), basic_values(2))
    assert len(actstore.open(path)) == 6  # context exit commits


def test_abort(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with actstore.create(path, BASIC) as w:
        w.append(mkkeys(2), basic_values(2))
        w.commit()
        w.append(mkkeys(3, 2), basic_values(3))
        w.set_view("v", [0, 1])
        assert w.abort() == 3 and w.pending == 0 and w.abort() == 0
        assert w.commit() == 1  # nothing left to commit (views dropped too)
        assert w.append(mkkeys(3, 2), basic_values(3)) == 3  # aborted keys are new again
        w.abort()
    s = actstore.open(path)
    assert len(s) == 2 and s.generation == 1 and s.views == []
    assert s.lookup(mkkeys(3, 2)).tolist() == [-1] * 3
    on_disk = set(os.listdir(path / "segments")) - {"zarr.json"}
    assert on_disk == {seg.id for seg in s.manifest.segments}  # aborted segments are gone


def test_append_copes_with_a_reused_key_buffer(tmp_path: Path) -> None:
    """Appending from one key buffer refilled between calls: each key is stored once."""
    buf = np.frombuffer(b"".join(mkkeys(8)), np.uint8).reshape(8, 32).copy()
    orig = buf.copy()
    with actstore.create(tmp_path / "s", BASIC) as w:
        assert w.append(buf, basic_values(8)) == 8
        buf[:] = np.frombuffer(b"".join(mkkeys(8, 100)), np.uint8).reshape(8, 32)
        assert w.append(buf, basic_values(8, seed=1)) == 8
        assert w.append(orig, basic_values(8, seed=2)) == 0
    s = actstore.open(tmp_path / "s")
    assert len(s) == 16
    s.verify()


def test_helper_threads_hash_and_write_back_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every write hashed on the helper thread and write-back after every batch."""
    import actstore.engine.write.segments as writer_mod

    monkeypatch.setattr(writer_mod, "PARALLEL_HASH_BYTES", 1)
    monkeypatch.setattr(writer_mod, "WRITEBACK_BYTES", 1)
    synced = []
    real = writer_mod._fdatasync
    monkeypatch.setattr(writer_mod, "_fdatasync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / "s"
    batches = [basic_values(50, seed=i) for i in range(6)]
    with actstore.create(path, BASIC) as w:
        for i, v in enumerate(batches):
            assert w.append(mkkeys(50, 50 * i), v) == 50
        assert w.append(mkkeys(50, 100), batches[2]) == 0  # pending duplicates, found via the key set
        w.commit()
    assert synced, "write-back never ran"
    s = actstore.open(path)
    s.verify()  # every file's BLAKE3 (computed on the helper thread) matches its bytes
    assert len(s) == 300
    for i, v in enumerate(batches):
        np.testing.assert_array_equal(s.gather(np.arange(50 * i, 50 * i + 50), "x")["x"].numpy(), v["x"])


@pytest.mark.parametrize("at", ["append", "commit"])
def test_write_back_error_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str) -> None:
    """A failed background fdatasync is raised (the kernel reports it once), and nothing of it is committed."""
    import errno
    import threading

    import actstore.engine.write.segments as writer_mod

    path = tmp_path / "s"
    with actstore.create(path, BASIC) as w:
        w.append(mkkeys(5), basic_values(5))
    monkeypatch.setattr(writer_mod, "WRITEBACK_BYTES", 1)
    failed = threading.Event()

    def fail(fd: int) -> None:
        failed.set()
        raise OSError(errno.EIO, "injected write-back error")

    monkeypatch.setattr(writer_mod, "_fdatasync", fail)
    w = actstore.open(path, mode="a")
    w.append(mkkeys(5, 5), basic_values(5, seed=1))  # starts the failing write-back
    with pytest.raises(OSError) as e:
        if at == "append":
            assert failed.wait(10)
            import time

            time.sleep(0.05)  # let the helper finish raising
            w.append(mkkeys(5, 10), basic_values(5, seed=2))
        else:
            w.commit()
    assert e.value.errno == errno.EIO
    assert len(actstore.open(path)) == 5 and w.pending == 0
    monkeypatch.undo()
    w.append(mkkeys(5, 5), basic_values(5, seed=1))  # the handle goes on
    w.close()
    assert len(actstore.open(path)) == 10
    assert set(os.listdir(path / "segments")) - {"zarr.json"} == {seg.id for seg in actstore.open(path).manifest.segments}


# --- reading ---------------------------------------------------------------------------


def test_lookup_contains_get_getitem(basic: actstore.ActivationStore) -> None:
    k = mkkeys(4)
    v = basic_values(3, seed=3)
    basic.append(k[:3], v)
    basic.commit()
    assert basic.lookup(k).tolist() == [0, 1, 2, -1]
    assert basic.lookup(np.frombuffer(b"".join(k), np.uint8).reshape(4, 32)).tolist() == [0, 1, 2, -1]
    assert basic.lookup(k[1]).tolist() == [1]  # a single key
    assert basic.lookup([]).tolist() == []
    assert k[0] in basic and k[3] not in basic and "not a key" not in basic
    assert basic.key_at([2, 0]).tobytes() == k[2] + k[0]
    np.testing.assert_array_equal(basic.get(k[1])["x"].numpy(), v["x"][1])
    with pytest.raises(KeyError):
        basic.get(k[3])
    np.testing.assert_array_equal(basic[-1]["x"].numpy(), v["x"][2])
    assert int(basic[-3]["n"]) == int(v["n"][0])
    for bad in (3, -4, 10**9):
        with pytest.raises(IndexError):
            basic[bad]
    with pytest.raises(TypeError):
        basic[1.0]  # type: ignore[index]
    with pytest.raises(TypeError):
        basic[True]  # type: ignore[index]
    with pytest.raises(ValueError):
        basic.lookup([b"short"])


def test_gather(basic: actstore.ActivationStore) -> None:
    v = basic_values(5, seed=4, lengths=[2, 0, 3, 1, 0])
    basic.append(mkkeys(5), v)
    basic.commit()
    out = basic.gather([4, -1, 0, 2])
    assert set(out) == {"x", "n", "t"}
    x, t = out["x"], out["t"]
    assert isinstance(x, torch.Tensor) and isinstance(t, RaggedBatch)
    np.testing.assert_array_equal(x.numpy(), v["x"][[4, 4, 0, 2]])
    assert t.lengths.tolist() == [0, 0, 2, 3]
    np.testing.assert_array_equal(t.values.numpy(), np.concatenate([v["t"][0], v["t"][2]]))
    assert list(basic.gather([1], fields=["n"])) == ["n"]
    assert list(basic.gather([1], fields="t")) == ["t"]
    empty = basic.gather([])
    assert dense(empty["x"]).shape == (0, 3) and len(empty["t"]) == 0
    with pytest.raises(KeyError):
        basic.gather([0], fields=["nope"])
    with pytest.raises(IndexError):
        basic.gather([5])
    with pytest.raises(IndexError):
        basic.gather([-6])
    with pytest.raises(TypeError):
        basic.gather([0.5])
    rows = list(basic.iter_rows())
    assert len(rows) == 5 and all(np.array_equal(r["x"].numpy(), v["x"][i]) for i, r in enumerate(rows))


def test_gather_with_dtype_and_padded(tmp_path: Path) -> None:
    path = tmp_path / "s"
    lengths = [[2, 0, 3], [1], [4, 2]]
    vals = [basic_values(len(ls), seed=10 + c, lengths=ls) for c, ls in enumerate(lengths)]
    with actstore.create(path, BASIC) as w:
        for c, v in enumerate(vals):  # three segments
            w.append(mkkeys(len(lengths[c]), 10 * c), v)
            w.commit()
    s = actstore.open(path)
    flat_t = [t for v in vals for t in v["t"]]
    flat_x = np.concatenate([v["x"] for v in vals])
    rows = [5, 0, 3, 2, 5]
    out = s.gather(rows, dtype=torch.float64)
    assert out["x"].dtype == torch.float64 and out["n"].dtype == torch.int16  # integers keep their dtype
    np.testing.assert_array_equal(out["x"].numpy(), flat_x[rows].astype(np.float64))
    t = out["t"]
    assert isinstance(t, RaggedBatch) and t.values.dtype == torch.float64
    np.testing.assert_array_equal(t.values.numpy(), np.concatenate([flat_t[r] for r in rows]).astype(np.float64))
    pb = s.gather_padded(rows, "t", dtype=torch.float32, pad_to_multiple_of=8, pad_value=-1)
    assert pb.values.shape == (5, 8, 2) and pb.values.dtype == torch.float32
    assert pb.lengths.tolist() == [len(flat_t[r]) for r in rows]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(pb.values[i, : len(flat_t[r])].numpy(), flat_t[r].astype(np.float32))
        assert (pb.values[i, len(flat_t[r]) :] == -1).all()
        assert pb.mask[i].tolist() == [k < len(flat_t[r]) for k in range(8)]
    assert s.gather_padded([], "t").values.shape == (0, 0, 2)
    with pytest.raises(ValueError, match="not ragged"):
        s.gather_padded([0], "x")
    with pytest.raises(KeyError, match="nope"):
        s.gather_padded([0], "nope")
    with pytest.raises(IndexError):
        s.gather_padded([6], "t")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        s.gather_padded([0], "t", pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="floating"):
        s.gather([0], dtype=torch.int32)  # would truncate the floats
    with pytest.raises(TypeError, match="floating"):
        s.gather_padded([0], "t", dtype="float32")  # type: ignore[arg-type]


@pytest.mark.parametrize(("stored", "want"), [("bfloat16", torch.float32), ("float32", torch.bfloat16),
                                              ("float16", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_gather_casts_to_and_from_bfloat16(tmp_path: Path, stored: str, want: torch.dtype) -> None:
    fields = {"a": Field((3,), stored), "t": Field((None, 2), stored)}
    x = torch.randn(20, 3).to(TORCH_DTYPES[stored])
    t = [torch.randn(k % 4, 2).to(TORCH_DTYPES[stored]) for k in range(20)]
    with actstore.create(tmp_path / "s", fields) as w:
        w.append(mkkeys(10), {"a": x[:10], "t": t[:10]})
        w.commit()
        w.append(mkkeys(10, 10), {"a": x[10:], "t": t[10:]})  # two segments: the bounce-buffer path too
    s = actstore.open(tmp_path / "s")
    rows = [13, 2, 19, 0]
    got = s.gather(rows, "a", dtype=want)["a"]
    assert got.dtype == want and torch.equal(got, x[rows].to(want))
    pb = s.gather_padded(rows, "t", dtype=want)
    assert pb.values.dtype == want
    for i, r in enumerate(rows):
        assert torch.equal(pb.values[i, : len(t[r])], t[r].to(want))


def test_keys_that_share_their_first_bytes(tmp_path: Path) -> None:
    """Zero-padded ids as keys: every key shares its 8-byte index prefix with all the others."""
    def ids(a: int, b: int) -> np.ndarray:
        k = np.zeros((b - a, 32), np.uint8)
        k[:, -4:] = np.arange(a, b, dtype=">u4").view(np.uint8).reshape(-1, 4)
        return k

    with actstore.create(tmp_path / "s", {"y": Field((), "int64")}) as w:
        for c in range(12):  # 12 commits: index runs get merged on the way
            assert w.append(ids(100 * c, 100 * c + 100), {"y": np.arange(100 * c, 100 * c + 100)}) == 100
            w.commit()
        assert w.append(ids(0, 1200), {"y": np.zeros(1200, np.int64)}) == 0  # all stored already
        assert w.append(ids(1150, 1250), {"y": np.arange(1150, 1250)}) == 50
    s = actstore.open(tmp_path / "s")
    probe = np.concatenate([ids(0, 1250)[::-1], ids(5000, 5010)])
    assert s.lookup(probe).tolist() == list(range(1249, -1, -1)) + [-1] * 10
    assert s.gather(s.lookup(ids(7, 9)))["y"].tolist() == [7, 8]
    s.verify()


def test_many_segments_and_index_runs(tmp_path: Path) -> None:
    """Gather across many segments equals a numpy reference; the key index stays right through run merges."""
    rng = np.random.default_rng(7)
    path = tmp_path / "s"
    all_keys: list[bytes] = []
    xs: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    w = actstore.create(path, {"x": Field((4,), "float32"), "t": Field((None, 3), "int32")}, chunk_bytes=32)
    early = actstore.open(path)
    max_runs = 0
    for c in range(13):
        n = int(rng.integers(1, 6))
        keys = mkkeys(n, len(all_keys))
        if c == 5:  # two keys that share their first 8 bytes (the index compares prefixes first)
            keys[1] = all_keys[0][:8] + keys[1][8:]
        x = rng.standard_normal((n, 4)).astype(np.float32)
        t = [rng.integers(-9, 9, (int(rng.integers(0, 4)), 3)).astype(np.int32) for _ in range(n)]
        assert w.append(keys, {"x": x, "t": t}) == n
        w.commit()
        all_keys += keys
        xs += list(x)
        ts += t
        max_runs = max(max_runs, len(w.manifest.indexes))
        assert w.lookup(all_keys).tolist() == list(range(len(all_keys)))
        if c == 1:
            early.refresh()  # a reader holding two runs that the writer will merge and delete
    assert len(w.manifest.segments) == 13
    assert max_runs <= 8 and len(w.manifest.indexes) < 13  # runs were merged
    on_disk = set(os.listdir(path / "indexes")) - {"zarr.json"}
    assert on_disk == {r.id for r in w.manifest.indexes}  # superseded runs were deleted
    w.close()
    s = actstore.open(path)
    n = len(all_keys)
    assert len(s) == n
    assert s.lookup(all_keys).tolist() == list(range(n))
    assert s.lookup(mkkeys(5, 1000)).tolist() == [-1] * 5
    idx = np.concatenate([rng.permutation(n), rng.integers(-n, n, 50)])
    out = s.gather(idx)
    ref = np.stack(xs)[idx]
    np.testing.assert_array_equal(dense(out["x"]).numpy(), ref)
    rb = out["t"]
    assert isinstance(rb, RaggedBatch)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(rb[j].numpy(), ts[i])
    assert s.verify().ok
    # the early reader mapped its runs before they were deleted and still finds its rows
    assert len(early) > 0 and early.lookup(all_keys[: len(early)]).tolist() == list(range(len(early)))


# --- zero copy -------------------------------------------------------------------------


def test_reads_are_views_of_the_map(tmp_path: Path) -> None:
    path = tmp_path / "s"
    vals = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    with actstore.create(path, {"x": Field((4,), "float32"), "b": Field((2,), "bfloat16")}) as w:
        w.append(mkkeys(10), {"x": vals, "b": vals[:, :2].to(torch.bfloat16)})
    s = actstore.open(path)
    a, b = s[3]["x"], s[3]["x"]
    assert a.data_ptr() == b.data_ptr()  # the same bytes, not two copies
    assert s[4]["x"].data_ptr() - a.data_ptr() == 16  # rows lie back to back in one map
    assert a.untyped_storage().nbytes() == 16  # the tensor is a view of one row, not a copy of the array
    assert s.get(mkkeys(4)[3])["x"].data_ptr() == a.data_ptr()
    bf = s[3]["b"]
    assert bf.dtype == torch.bfloat16 and bf.data_ptr() == s[3]["b"].data_ptr()
    assert dense(s.gather([3])["x"]).data_ptr() != a.data_ptr()  # gather copies


def test_writing_into_a_view_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    vals = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with actstore.create(path, {"x": Field((4,), "float32")}) as w:
        w.append(mkkeys(3), {"x": vals})
    s = actstore.open(path)
    data_file = shard_path(s, 0, "fields/x/c/0/0")
    before = data_file.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = s[1]["x"]
        t.add_(1000)
        t.numpy()[0] = -5
    assert data_file.read_bytes() == before
    again = actstore.open(path)
    assert torch.equal(again[1]["x"], vals[1])
    assert again.verify().ok


def test_views_outlive_close_and_deletion(tmp_path: Path) -> None:
    path = tmp_path / "s"
    big = torch.arange(4 * 4096, dtype=torch.float32).reshape(4, 4096)  # 16 KiB rows: pages not yet touched
    rows = [torch.arange(k * 1000, dtype=torch.int64) for k in (1, 3)]
    with actstore.create(path, {"x": Field((4096,), "float32"), "t": Field(None, "int64")}) as w:
        w.append(mkkeys(2), {"x": big[:2], "t": rows})
        w.commit()
        w.append(mkkeys(2, 2), {"x": big[2:], "t": rows})
    s = actstore.open(path)
    held = [s[3]["x"], s[1]["t"], s[0]["x"]]
    s.close()
    with pytest.raises(StoreError):
        s[0]
    shutil.rmtree(path)
    gc.collect()
    assert not path.exists()
    assert torch.equal(held[0], big[3]) and torch.equal(held[1], rows[1]) and torch.equal(held[2], big[0])


# --- lock -------------------------------------------------------------------------------


def test_lock_one_writer(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, BASIC)
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        actstore.open(path, mode="a")
    with pytest.raises(BlockingIOError):
        actstore.open(path, mode="a")
    with actstore.open(path):  # readers never need the lock
        pass
    w.append(mkkeys(1), basic_values(1))
    w.close()
    with actstore.open(path, mode="a") as w2:  # released on close
        assert len(w2) == 1
    w3 = actstore.open(path, mode="a")
    del w3  # a forgotten writer releases its lock when collected
    gc.collect()
    actstore.open(path, mode="a").close()


_CHILD = r"""
import sys, time
import numpy as np
import actstore
s = actstore.open(sys.argv[1], mode="a")
keys = [bytes([200 + i]) * 32 for i in range(3)]
s.append(keys, {"x": np.ones((3, 3), np.float32)})
s.set_view("v", [0, 1, 2])
print("ready", flush=True)
time.sleep(120)
"""


def test_killed_writer_releases_lock_and_leaves_nothing_visible(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with actstore.create(path, {"x": Field((3,), "float32")}) as w:
        w.append(mkkeys(2), {"x": np.zeros((2, 3), np.float32)})
    committed = set(os.listdir(path / "segments"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
            actstore.open(path, mode="a")
        leftovers = set(os.listdir(path / "segments")) - committed
        assert len(leftovers) == 1  # the child's pending segment is on disk...
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    r = actstore.open(path)  # ...but never visible
    ghost = [bytes([200 + i]) * 32 for i in range(3)]
    assert len(r) == 2 and r.lookup(ghost).tolist() == [-1] * 3 and r.views == []
    assert set(os.listdir(path / "segments")) - committed == leftovers  # readers do not clean up
    with actstore.open(path, mode="a") as w2:  # the kernel dropped the dead writer's lock
        assert set(os.listdir(path / "segments")) == committed  # leftovers removed
        assert not [n for n in os.listdir(path) if n.endswith(".tmp")]
        assert w2.append(ghost, {"x": np.ones((3, 3), np.float32)}) == 3
    assert len(actstore.open(path)) == 5


# --- views -------------------------------------------------------------------------------


def test_views(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, BASIC)
    w.append(mkkeys(3), basic_values(3))
    with pytest.raises(ValueError, match="values must lie"):
        w.set_view("bad", [3])
    w.append(mkkeys(1, 3), basic_values(1))
    w.set_view("order", [2, -1, 0, 3])  # rows may be pending: they come with the same commit
    with pytest.raises(ValueError, match="values must lie"):
        w.set_view("bad", [4])
    with pytest.raises(ValueError, match="values must lie"):
        w.set_view("bad", [-2])
    with pytest.raises(TypeError):
        w.set_view("bad", [[0]])
    with pytest.raises(TypeError):
        w.set_view("bad", [0.5])
    with pytest.raises(ValueError, match="invalid name"):
        w.set_view("a/b", [0])
    assert w.views == []
    w.commit()
    assert w.views == ["order"] and w.view("order").tolist() == [2, -1, 0, 3]
    r = actstore.open(path)
    assert r.views == ["order"] and r.view("order").dtype == np.int64
    assert r.view("order").tolist() == [2, -1, 0, 3]
    with pytest.raises(KeyError):
        r.view("nope")
    with pytest.raises(StoreError, match="read-only"):
        r.set_view("x", [0])
    old_id = w.manifest.views["order"].id
    w.set_view("order", [1, 1])
    w.set_view("second", np.arange(4))
    w.commit()
    assert w.view("order").tolist() == [1, 1] and w.views == ["order", "second"]
    assert not (path / "views" / old_id).exists()  # the replaced view was deleted
    assert r.view("order").tolist() == [2, -1, 0, 3]  # an older snapshot keeps its view
    assert r.refresh() and r.view("order").tolist() == [1, 1] and r.views == ["order", "second"]
    w.close()
    assert actstore.open(path).verify().ok


# --- verify, corruption -------------------------------------------------------------------


def _small_store(path: Path) -> actstore.ActivationStore:
    with actstore.create(path, BASIC) as w:
        w.append(mkkeys(4), basic_values(4, lengths=[1, 2, 0, 3]))
        w.commit()
        w.set_view("v", [3, 2, 1, 0])
        w.append(mkkeys(2, 4), basic_values(2, seed=1))
    return actstore.open(path)


def test_verify_passes_on_a_good_store(tmp_path: Path) -> None:
    s = _small_store(tmp_path / "s")
    report = s.verify()
    assert report.ok and report.rows == 6 and report.files > 0 and report.bytes > 0


@pytest.mark.parametrize("rel", ["fields/x/c/0/0", "fields/t/values/c/0/0", "fields/t/offsets/c/0", "keys/c/0/0"])
def test_verify_detects_a_flipped_byte(tmp_path: Path, rel: str) -> None:
    s = _small_store(tmp_path / "s")
    target = shard_path(s, 0, rel)
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=str(target)):
        actstore.open(tmp_path / "s").verify()


def test_verify_detects_damaged_metadata(tmp_path: Path) -> None:
    s = _small_store(tmp_path / "s")
    target = shard_path(s, 1, "zarr.json")
    target.write_bytes(target.read_bytes().replace(b'"rows": 2', b'"rows": 3'))
    with pytest.raises(CorruptStoreError, match="checksum does not match the manifest"):
        actstore.open(tmp_path / "s").verify()


def test_truncated_data_file_raises_instead_of_sigbus(tmp_path: Path) -> None:
    s = _small_store(tmp_path / "s")
    target = shard_path(s, 0, "fields/x/c/0/0")
    with open(target, "r+b") as f:
        f.truncate(13)
    fresh = actstore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=str(target)):
        fresh[3]
    with pytest.raises(CorruptStoreError, match=str(target)):
        fresh.gather([0, 5])
    assert torch.equal(fresh[5]["n"], s[5]["n"])  # other segments and fields still read
    with pytest.raises(CorruptStoreError, match=str(target)):
        fresh.verify()


# --- pickling -----------------------------------------------------------------------------


def test_pickle_reader_keeps_snapshot_and_writer_refuses(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, BASIC)
    w.append(mkkeys(3), basic_values(3))
    w.set_view("v", [2, 1])
    w.commit()
    r = actstore.open(path)
    blob = pickle.dumps(r)
    with pytest.raises(TypeError, match="mode='r'"):
        pickle.dumps(w)
    w.append(mkkeys(2, 3), basic_values(2))
    w.commit()
    copy = pickle.loads(blob)
    assert copy.mode == "r" and len(copy) == 3 and copy.generation == r.generation
    assert copy.lookup(mkkeys(5)).tolist() == [0, 1, 2, -1, -1]
    assert copy.view("v").tolist() == [2, 1]
    for name in ("x", "n"):
        assert torch.equal(copy.gather([0, 1, 2])[name], r.gather([0, 1, 2])[name])  # type: ignore[arg-type]
    assert copy.refresh() and len(copy) == 5
    w.close()


# --- CLI -----------------------------------------------------------------------------------


def test_cli_info_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    s = _small_store(tmp_path / "s")
    assert cli_main(["info", s.path]) == 0
    out = capsys.readouterr().out
    assert "rows         6" in out and "float16" in out and "ragged" in out
    assert cli_main(["info", "--json", s.path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 6 and info["segments"] == 2 and info["views"] == {"v": 4}
    assert cli_main(["verify", "-q", s.path]) == 0
    assert "OK: 6 rows" in capsys.readouterr().out
    target = shard_path(s, 1, "fields/n/c/0")
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    assert cli_main(["verify", "-q", s.path]) == 1
    assert str(target) in capsys.readouterr().err
    assert cli_main(["info", str(tmp_path / "missing")]) == 1
    assert "no store here" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path: Path) -> None:
    s = _small_store(tmp_path / "s")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    target = shard_path(s, 0, "keys/c/0/0")
    with open(target, "r+b") as f:
        f.truncate(10)
    done = subprocess.run([sys.executable, "-m", "actstore", "verify", "-q", s.path], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert str(target) in done.stderr and "error" in done.stderr


# --- Zarr interop ---------------------------------------------------------------------------

INTEROP = {
    "f32": Field((3,), "float32"),
    "bf": Field((2,), "bfloat16"),
    "f16": Field((2, 2), "float16"),
    "i8": Field((), "int8"),
    "i64": Field((), "int64"),
    "u8": Field((5,), "uint8"),
    "flag": Field((2,), "bool"),
    "tok": Field((None, 2), "float16"),
    "ids": Field(None, "int32"),
}


def _interop_values(n: int, seed: int, empty: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (name, f) in enumerate(INTEROP.items()):
        if f.ragged:
            lengths = [0] * n if empty else [(seed + j) % 4 for j in range(n)]
            flat = sample(f.dtype, (sum(lengths), *f.inner_shape), seed + i)
            out[name] = list(torch.split(flat, lengths))
        else:
            out[name] = sample(f.dtype, (n, *f.inner_shape), seed + i)
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_zarr_reads_everything_actstore_reads(tmp_path: Path, compression: str | None) -> None:
    path = tmp_path / "s"
    fields = {n: Field(f.shape, f.dtype, compression=compression) for n, f in INTEROP.items()}
    with actstore.create(path, fields, chunk_bytes=8) as w:  # many inner chunks, partial last ones
        for c, n in enumerate((7, 1, 3)):
            w.append(mkkeys(n, 10 * c), _interop_values(n, seed=c, empty=(c == 1)))
            w.commit()
        w.set_view("order", [4, 2, -1])
    s = actstore.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(path), mode="r")
        manifest: Any = group.attrs.asdict()["actstore"]
        assert manifest["rows"] == 11 and manifest["version"] == 1
        members = dict(group.members(max_depth=None))
        start = 0
        for seg in s.manifest.segments:
            rows = np.arange(start, start + seg.rows)
            start += seg.rows
            base = f"segments/{seg.id}"
            got = s.gather(rows)
            keys = zarr.open_array(store=str(path), path=f"{base}/keys", mode="r")
            np.testing.assert_array_equal(keys[:], s.key_at(rows))
            assert isinstance(members[f"{base}/keys"], zarr.Array)
            for name, f in fields.items():
                if f.ragged:
                    rb = got[name]
                    assert isinstance(rb, RaggedBatch)
                    values = zarr.open_array(store=str(path), path=f"{base}/fields/{name}/values", mode="r")
                    offsets = zarr.open_array(store=str(path), path=f"{base}/fields/{name}/offsets", mode="r")
                    assert values.dtype == np.dtype(f.spec.numpy) and offsets.dtype == np.dtype("int64")
                    np.testing.assert_array_equal(values[:], _as_numpy(rb.values))
                    np.testing.assert_array_equal(offsets[:], rb.offsets.numpy())
                else:
                    arr = zarr.open_array(store=str(path), path=f"{base}/fields/{name}", mode="r")
                    want = _as_numpy(got[name])  # type: ignore[arg-type]
                    assert arr.shape == want.shape and arr.dtype == want.dtype
                    np.testing.assert_array_equal(arr[:], want)
                    if len(want) > 1:  # a read of one inner chunk
                        np.testing.assert_array_equal(arr[1:2], want[1:2])
        prefixes, rows_ = [], []
        for run in s.manifest.indexes:
            prefixes.append(zarr.open_array(store=str(path), path=f"indexes/{run.id}/prefix", mode="r")[:])
            rows_.append(zarr.open_array(store=str(path), path=f"indexes/{run.id}/row", mode="r")[:])
        all_rows = np.concatenate(rows_)
        assert sorted(all_rows.tolist()) == list(range(11))
        keys_all = s.key_at(all_rows)
        np.testing.assert_array_equal(np.concatenate(prefixes), keys_all[:, :8].copy().view(">u8").ravel())
        view = zarr.open_array(store=str(path), path=f"views/{s.manifest.views['order'].id}/row", mode="r")
        np.testing.assert_array_equal(view[:], s.view("order"))


# --- random operation sequences against a model ------------------------------------------------

POOL = mkkeys(9, tag=b"pool")
POOL[1] = POOL[0][:8] + POOL[1][8:]  # a shared 8-byte prefix
SMALL = {"x": Field((2,), "float32"), "t": Field((None, 2), "int16")}


class StoreModel(RuleBasedStateMachine):
    """Random append/commit/abort/reopen sequences; after each step the store must match a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="actstore-model-")
        self.path = os.path.join(self.dir, "s")
        self.store = actstore.create(self.path, SMALL, chunk_bytes=16)
        self.committed: list[tuple[bytes, np.ndarray, np.ndarray]] = []
        self.pending: list[tuple[bytes, np.ndarray, np.ndarray]] = []

    def _known(self) -> set[bytes]:
        return {k for k, _, _ in self.committed + self.pending}

    @rule(picks=st.lists(st.integers(0, len(POOL) - 1), max_size=5), seed=st.integers(0, 2**16))
    def append(self, picks: list[int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        keys = [POOL[i] for i in picks]
        x = rng.standard_normal((len(keys), 2)).astype(np.float32)
        t = [rng.integers(-99, 99, (int(rng.integers(0, 3)), 2)).astype(np.int16) for _ in keys]
        known = self._known()
        new = 0
        for k, xi, ti in zip(keys, x, t, strict=True):
            if k not in known:
                known.add(k)
                self.pending.append((k, xi, ti))
                new += 1
        assert self.store.append(keys, {"x": x, "t": t}) == new

    @rule(picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3))
    def bad_append(self, picks: list[int]) -> None:
        keys = [POOL[i] for i in picks]
        with pytest.raises(ValueError):
            self.store.append(keys, {"x": np.zeros((len(keys), 2)), "t": [np.full((1, 2), 10**6)] * len(keys)})

    @rule()
    def commit(self) -> None:
        self.store.commit()
        self.committed += self.pending
        self.pending = []

    @rule()
    def abort(self) -> None:
        assert self.store.abort() == len(self.pending)
        self.pending = []

    @rule()
    def reopen(self) -> None:
        self.store.close()  # commits
        self.committed += self.pending
        self.pending = []
        self.store = actstore.open(self.path, mode="a")

    @rule()
    def fresh_reader(self) -> None:
        self._check(actstore.open(self.path))

    @invariant()
    def matches_model(self) -> None:
        assert self.store.pending == len(self.pending)
        self._check(self.store)

    def _check(self, s: actstore.ActivationStore) -> None:
        assert len(s) == len(self.committed)
        where = {k: i for i, (k, _, _) in enumerate(self.committed)}
        assert s.lookup(POOL).tolist() == [where.get(k, -1) for k in POOL]
        if self.committed:
            out = s.gather(np.arange(len(self.committed)))
            np.testing.assert_array_equal(dense(out["x"]).numpy(), np.stack([x for _, x, _ in self.committed]))
            rb = out["t"]
            assert isinstance(rb, RaggedBatch)
            for j, (_, _, t) in enumerate(self.committed):
                np.testing.assert_array_equal(rb[j].numpy(), t)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=30, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_update_attrs_commits_through_the_one_commit(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with actstore.create(path, BASIC, attrs={"a": 1, "b": {"c": 2}}) as w:
        w.append(mkkeys(3), basic_values(3))
        w.commit()
        reader = actstore.open(path)
        w.update_attrs({"b": [1, 2]}, d="x")
        assert dict(w.attrs) == {"a": 1, "b": {"c": 2}}  # pending until the commit
        assert w.commit() == 2
        assert dict(w.attrs) == {"a": 1, "b": [1, 2], "d": "x"}
        with pytest.raises(TypeError, match="JSON"):
            w.update_attrs(e=object())
        w.update_attrs(a=5)
        assert w.abort() == 0 and w.commit() == 2  # abort dropped the pending attribute
    assert reader.refresh() and dict(reader.attrs) == {"a": 1, "b": [1, 2], "d": "x"} and len(reader) == 3
    with pytest.raises(StoreError, match="read-only"):
        reader.update_attrs(a=2)
    on_disk = json.loads((path / "zarr.json").read_text())
    assert on_disk["attributes"]["actstore"]["attrs"]["d"] == "x"
