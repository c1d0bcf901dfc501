"""Bad inputs at the API: a clear TypeError/ValueError (or the documented error), the store unchanged.

Every case runs against a store with committed rows and pending rows; after the
refused call the files on disk, the committed rows and the pending rows are as
they were, and the handle still works.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import Field, RaggedBatch

from . import harness as h

K = h.key_of
GOOD = h.batch(100, 103)  # three new rows, valid


def vals(**over: Any) -> dict[str, Any]:
    v = dict(GOOD[1])
    v.update(over)
    return v


# (id, call, expected exception) — ``s`` is a store open for appending.
WRITER_CASES: list[tuple[str, Callable[[actstore.ActivationStore], Any], type[BaseException] | tuple[type[BaseException], ...]]] = [
    ("keys-int", lambda s: s.append(123, vals()), TypeError),
    ("keys-str", lambda s: s.append("abc", vals()), TypeError),
    ("keys-generator", lambda s: s.append((k for k in GOOD[0]), vals()), TypeError),
    ("keys-not-bytes", lambda s: s.append([1, 2, 3], vals()), TypeError),
    ("key-31-bytes", lambda s: s.append([K(1), K(2)[:31], K(3)], vals()), ValueError),
    ("key-33-bytes", lambda s: s.append([K(1), K(2) + b"x", K(3)], vals()), ValueError),
    ("key-empty", lambda s: s.append([b"", K(2), K(3)], vals()), ValueError),
    ("keys-float-array", lambda s: s.append(np.zeros((3, 32)), vals()), (TypeError, ValueError)),
    ("keys-short-rows", lambda s: s.append(np.zeros((3, 16), np.uint8), vals()), ValueError),
    ("keys-1d", lambda s: s.append(np.zeros(96, np.uint8), vals()), ValueError),
    ("values-not-dict", lambda s: s.append(GOOD[0], [1, 2, 3]), TypeError),
    ("values-missing-field", lambda s: s.append(GOOD[0], {"h": GOOD[1]["h"], "lab": GOOD[1]["lab"]}), ValueError),
    ("values-extra-field", lambda s: s.append(GOOD[0], vals(extra=np.zeros(3))), ValueError),
    ("fewer-values-than-keys", lambda s: s.append(GOOD[0], vals(h=GOOD[1]["h"][:2])), ValueError),
    ("more-values-than-keys", lambda s: s.append(GOOD[0][:2], vals()), ValueError),
    ("ragged-fewer-rows", lambda s: s.append(GOOD[0], vals(tok=GOOD[1]["tok"][:2])), ValueError),
    ("wrong-row-shape", lambda s: s.append(GOOD[0], vals(h=np.zeros((3, 23), np.float32))), ValueError),
    ("scalar-field-2d", lambda s: s.append(GOOD[0], vals(lab=np.zeros((3, 1), np.int64))), ValueError),
    ("strings", lambda s: s.append(GOOD[0], vals(lab=["a", "b", "c"])), TypeError),
    ("objects", lambda s: s.append(GOOD[0], vals(lab=np.array([object()] * 3))), TypeError),
    ("python-int-too-big", lambda s: s.append(GOOD[0], vals(lab=[2**70, 1, 2])), (TypeError, ValueError)),
    ("float-into-int", lambda s: s.append(GOOD[0], vals(lab=np.array([0.5, 1, 2]))), ValueError),
    ("bool-into-float", lambda s: s.append(GOOD[0], vals(h=np.ones((3, 24), bool))), ValueError),
    ("quantised-nan", lambda s: s.append(GOOD[0], vals(q=[np.full((2, 4), np.nan, np.float32)] * 3)), ValueError),
    ("quantised-inf", lambda s: s.append(GOOD[0], vals(q=[np.full((1, 4), -np.inf, np.float32)] * 3)), ValueError),
    ("complex", lambda s: s.append(GOOD[0], vals(h=np.ones((3, 24), np.complex64))), (TypeError, ValueError)),
    ("nan-refused", lambda s: s.append(GOOD[0], vals(h=np.full((3, 24), np.nan, np.float32)), allow_nonfinite=False),
     ValueError),
    ("inf-refused", lambda s: s.append(GOOD[0], vals(h=np.full((3, 24), np.inf, np.float32)), allow_nonfinite=False),
     ValueError),
    ("overflow-to-inf-refused", lambda s: s.append(GOOD[0], vals(tok=[np.full((1, 4), 1e6)] * 3), allow_nonfinite=False),
     ValueError),  # 1e6 is finite in float64 but inf in the float16 field
    ("ragged-not-list", lambda s: s.append(GOOD[0], vals(tok=np.zeros((3, 2, 4)))), TypeError),
    ("ragged-wrong-inner", lambda s: s.append(GOOD[0], vals(tok=[np.zeros((2, 5))] * 3)), ValueError),
    ("ragged-1d-row", lambda s: s.append(GOOD[0], vals(tok=[np.zeros(4)] * 3)), ValueError),
    ("ragged-mixed-dtypes", lambda s: s.append(GOOD[0], vals(tok=[np.zeros((1, 4), np.float32), np.zeros((1, 4)),
                                                                   np.zeros((1, 4), np.float32)])), ValueError),
    ("ragged-batch-short", lambda s: s.append(GOOD[0], vals(tok=RaggedBatch.from_list([torch.zeros(1, 4)] * 2))),
     ValueError),
    ("set-view-bad-name", lambda s: s.set_view("../x", [0]), ValueError),
    ("set-view-empty-name", lambda s: s.set_view("", [0]), ValueError),
    ("set-view-name-int", lambda s: s.set_view(7, [0]), ValueError),  # type: ignore[arg-type]
    ("set-view-floats", lambda s: s.set_view("v", [0.5]), TypeError),
    ("set-view-2d", lambda s: s.set_view("v", [[0, 1]]), TypeError),
    ("set-view-row-too-big", lambda s: s.set_view("v", [10**6]), ValueError),
    ("set-view-below-minus-one", lambda s: s.set_view("v", [-2]), ValueError),
]

READER_CASES: list[tuple[str, Callable[[actstore.ActivationStore], Any], type[BaseException] | tuple[type[BaseException], ...]]] = [
    ("lookup-int", lambda s: s.lookup(123), TypeError),
    ("lookup-str", lambda s: s.lookup("abc"), TypeError),
    ("lookup-31-bytes", lambda s: s.lookup([K(0)[:31]]), ValueError),
    ("gather-floats", lambda s: s.gather([0.5]), TypeError),
    ("gather-bools", lambda s: s.gather(np.array([True, False])), TypeError),
    ("gather-str", lambda s: s.gather("abc"), TypeError),
    ("gather-none", lambda s: s.gather(None), TypeError),
    ("gather-out-of-range", lambda s: s.gather([10**9]), IndexError),
    ("gather-negative-out-of-range", lambda s: s.gather([-(10**9)]), IndexError),
    ("gather-int64-max", lambda s: s.gather([2**63 - 1]), IndexError),
    ("gather-uint64-huge", lambda s: s.gather(np.array([2**64 - 1], np.uint64)), IndexError),
    ("gather-unknown-field", lambda s: s.gather([0], fields=["nope"]), KeyError),
    ("getitem-str", lambda s: s["a"], TypeError),
    ("getitem-float", lambda s: s[1.0], TypeError),
    ("getitem-bool", lambda s: s[True], TypeError),
    ("getitem-none", lambda s: s[None], TypeError),
    ("getitem-out-of-range", lambda s: s[10**9], IndexError),
    ("getitem-negative-out-of-range", lambda s: s[-(10**9)], IndexError),
    ("get-absent", lambda s: s.get(K(10**6)), KeyError),
    ("get-31-bytes", lambda s: s.get(K(0)[:31]), ValueError),
    ("get-int", lambda s: s.get(123), TypeError),
    ("view-unknown", lambda s: s.view("nope"), KeyError),
    ("key-at-out-of-range", lambda s: s.key_at([10**9]), IndexError),
    ("key-at-floats", lambda s: s.key_at([0.5]), TypeError),
]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file of the store (but the lock) and its SHA-256."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if rel != "lock/zarr.json":
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def writer(tmp_path: Path) -> Any:
    path = tmp_path / "s"
    h.make_store(path)
    s = actstore.open(path, mode="a")
    h.append_range(s, h.INITIAL_ROWS, h.INITIAL_ROWS + 5)  # pending rows
    yield s
    s.abort()
    s.close()


@pytest.mark.parametrize("call,exc", [(c, e) for _, c, e in WRITER_CASES + READER_CASES],
                         ids=[i for i, _, _ in WRITER_CASES + READER_CASES])
def test_bad_input_refused_store_unchanged(writer: actstore.ActivationStore, call: Any, exc: Any) -> None:
    path = Path(writer.path)
    before, pending, gen = tree_digest(path), writer.pending, writer.generation
    with pytest.raises(exc) as info:
        call(writer)
    assert str(info.value), "an error without a message"
    h.count("api_cases")
    assert writer.pending == pending and writer.generation == gen
    assert tree_digest(path) == before, "a refused call changed files on disk"
    assert writer.append(*GOOD) == 3 and writer.pending == pending + 3  # the handle still works


def test_handle_commits_after_refused_calls(writer: actstore.ActivationStore) -> None:
    for _, call, exc in WRITER_CASES + READER_CASES:
        with pytest.raises(exc):
            call(writer)
    assert writer.append(*GOOD) == 3
    writer.commit()
    with actstore.open(writer.path) as r:
        assert len(r) == h.INITIAL_ROWS + 5 + 3
        assert r.lookup([K(100), K(101), K(102)]).tolist() == [h.INITIAL_ROWS + 5 + i for i in range(3)]


@pytest.fixture(scope="module")
def read_only_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "s"
    h.make_store(path)
    return path


@pytest.mark.parametrize("call,exc", [(c, e) for _, c, e in READER_CASES], ids=[i for i, _, _ in READER_CASES])
def test_bad_input_refused_by_reader(read_only_store: Path, call: Any, exc: Any) -> None:
    before = tree_digest(read_only_store)
    with actstore.open(read_only_store) as s, pytest.raises(exc):
        call(s)
    assert tree_digest(read_only_store) == before
    h.count("api_cases")


def test_empty_inputs_are_fine(writer: actstore.ActivationStore) -> None:
    empty_values = {"h": np.empty((0, 24), np.float32), "tok": [], "lab": np.empty(0, np.int64), "q": []}
    assert writer.append([], empty_values) == 0
    assert writer.append(np.empty((0, 32), np.uint8), empty_values) == 0
    assert writer.lookup([]).shape == (0,)
    assert len(writer.gather([])["lab"]) == 0
    assert writer.key_at([]).shape == (0, 32)
    writer.set_view("empty", [])
    writer.commit()
    assert len(writer.view("empty")) == 0
    h.count("api_cases", 6)


def test_nonfinite_values_are_stored_bit_exactly(tmp_path: Path) -> None:
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32)
    nan_payload = np.array([0x7FC00001], np.uint32).view(np.float32)
    with actstore.create(tmp_path / "s", {"x": Field((7,), "float32")}) as s:
        s.append([K(0)], {"x": [np.concatenate([special, nan_payload])]})
    with actstore.open(tmp_path / "s") as s:
        got = s[0]["x"].numpy()
    assert got.view(np.uint32).tolist() == np.concatenate([special, nan_payload]).view(np.uint32).tolist()
    h.count("api_cases")


def test_repeated_keys_are_stored_once(writer: actstore.ActivationStore) -> None:
    k, v = h.batch(0, 3)  # already committed
    assert writer.append(k, v) == 0
    k2 = np.concatenate([GOOD[0], GOOD[0]])
    v2 = {"h": np.concatenate([GOOD[1]["h"]] * 2), "tok": GOOD[1]["tok"] * 2, "lab": np.concatenate([GOOD[1]["lab"]] * 2),
          "q": GOOD[1]["q"] * 2}
    assert writer.append(k2, v2) == 3
    assert writer.append(*GOOD) == 0
    writer.commit()
    assert len(writer) == h.INITIAL_ROWS + 5 + 3
    h.count("api_cases")


CREATE_CASES = [
    ("no-fields", lambda p: actstore.create(p, {}), ValueError),
    ("fields-list", lambda p: actstore.create(p, [Field((2,))]), ValueError),
    ("field-name-traversal", lambda p: actstore.create(p, {"../x": Field((2,))}), ValueError),
    ("field-name-slash", lambda p: actstore.create(p, {"a/b": Field((2,))}), ValueError),
    ("field-name-zarr-json", lambda p: actstore.create(p, {"zarr.json": Field((2,))}), ValueError),
    ("field-not-field", lambda p: actstore.create(p, {"x": (2,)}), TypeError),
    ("chunk-bytes-zero", lambda p: actstore.create(p, {"x": Field((2,))}, chunk_bytes=0), ValueError),
    ("chunk-bytes-bool", lambda p: actstore.create(p, {"x": Field((2,))}, chunk_bytes=True), ValueError),
    ("chunk-bytes-float", lambda p: actstore.create(p, {"x": Field((2,))}, chunk_bytes=1.5), ValueError),
    ("attrs-object", lambda p: actstore.create(p, {"x": Field((2,))}, attrs={"a": object()}), TypeError),
    ("attrs-nan", lambda p: actstore.create(p, {"x": Field((2,))}, attrs={"a": math.nan}), TypeError),
    ("fingerprint-int", lambda p: actstore.create(p, {"x": Field((2,))}, fingerprint=123), TypeError),
]


@pytest.mark.parametrize("call,exc", [(c, e) for _, c, e in CREATE_CASES], ids=[i for i, _, _ in CREATE_CASES])
def test_create_refuses_bad_arguments_and_creates_nothing(tmp_path: Path, call: Any, exc: Any) -> None:
    path = tmp_path / "new"
    with pytest.raises(exc):
        call(path)
    assert not path.exists(), "a refused create() left a directory behind"
    h.count("api_cases")


def test_create_and_open_refuse_wrong_places(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    h.make_store(tmp_path / "s")
    before = tree_digest(tmp_path / "s")
    with pytest.raises(actstore.StoreExistsError):
        actstore.create(tmp_path / "file", h.FIELDS)
    with pytest.raises(actstore.StoreExistsError):
        actstore.create(tmp_path / "full", h.FIELDS)
    with pytest.raises(actstore.StoreExistsError):
        actstore.create(tmp_path / "s", h.FIELDS)
    with pytest.raises(actstore.StoreExistsError):
        actstore.create(tmp_path / "s", {"other": Field((2,))}, exist_ok=True)
    with pytest.raises(ValueError):
        actstore.open(tmp_path / "s", mode="w")
    with pytest.raises(actstore.StoreNotFoundError):
        actstore.open(tmp_path / "nothing")
    with pytest.raises(actstore.StoreNotFoundError):
        actstore.open(tmp_path / "file")
    with pytest.raises(actstore.StoreNotFoundError):
        actstore.open(tmp_path / "full")
    with pytest.raises(actstore.StaleStoreError):
        actstore.open(tmp_path / "s", fingerprint="0" * 64)
    assert (tmp_path / "file").read_text() == "x" and os.listdir(tmp_path / "full") == ["other.txt"]
    assert tree_digest(tmp_path / "s") == before
    h.count("api_cases", 10)


FIELD_CASES = [
    ("negative", lambda: Field(-1), ValueError),
    ("zero", lambda: Field((0,)), ValueError),
    ("float-dim", lambda: Field((1.5,)), ValueError),
    ("bool-dim", lambda: Field((True,)), ValueError),
    ("str-shape", lambda: Field("ab"), ValueError),
    ("object-shape", lambda: Field(object()), TypeError),
    ("two-ragged", lambda: Field((None, None)), ValueError),
    ("ragged-not-first", lambda: Field((3, None)), ValueError),
    ("too-many-dims", lambda: Field((1,) * 9), ValueError),
    ("dim-too-big", lambda: Field((2**41,)), ValueError),
    ("too-many-elements", lambda: Field((2**30, 2**30)), ValueError),
    ("float64", lambda: Field((2,), "float64"), TypeError),
    ("complex", lambda: Field((2,), "complex64"), TypeError),
    ("unknown-dtype", lambda: Field((2,), "float99"), TypeError),
    ("dtype-object", lambda: Field((2,), object()), TypeError),
    ("torch-float64", lambda: Field((2,), torch.float64), TypeError),
]


@pytest.mark.parametrize("call,exc", [(c, e) for _, c, e in FIELD_CASES], ids=[i for i, _, _ in FIELD_CASES])
def test_field_refuses_bad_specs(call: Any, exc: Any) -> None:
    with pytest.raises(exc):
        call()
    h.count("api_cases")


def test_read_only_and_closed_handles(tmp_path: Path) -> None:
    path = tmp_path / "s"
    h.make_store(path)
    before = tree_digest(path)
    r = actstore.open(path)
    for call in (lambda: r.append(*GOOD), r.commit, r.abort, lambda: r.set_view("v", [0])):
        with pytest.raises(actstore.StoreError, match="read-only"):
            call()
    r.close()
    r.close()  # idempotent
    for call in (lambda: r.lookup([K(0)]), lambda: r.gather([0]), lambda: r[0], r.verify, r.refresh, lambda: r.view("order"),
                 lambda: r.key_at([0]), lambda: next(r.iter_rows())):
        with pytest.raises(actstore.StoreError, match="closed"):
            call()
    assert tree_digest(path) == before
    h.count("api_cases", 12)
