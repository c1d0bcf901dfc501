"""Precompute's per-row bookkeeping out of the heap: scratch arrays, the key set in scratch files, the index merge."""

from __future__ import annotations

import importlib
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
from actstore import Field
from actstore.engine.commit import MAX_INDEX_RUNS, merge_runs
from actstore.engine.read.snapshot import Snapshot
from actstore.engine.write.keyset import KeySet
from actstore.errors import CorruptStoreError
from actstore.storage.scratch import ScratchArray, scratch_dir

keyset_module = importlib.import_module("actstore.engine.write.keyset")


def _mapped(arr: np.ndarray) -> bool:
    base: Any = arr
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return isinstance(base, mmap.mmap)


@pytest.mark.parametrize("on_disk", [False, True])
def test_scratch_array_grows_and_keeps_earlier_views(tmp_path: Path, on_disk: bool) -> None:
    a = ScratchArray(np.int64, (3,), str(tmp_path) if on_disk else None)
    first = np.arange(30).reshape(10, 3)
    a.append(first)
    early = a.view()
    for i in range(1, 2000):  # grows several times
        a.append(np.full((5, 3), i))
    assert len(a) == 10 + 5 * 1999 and a.view().shape == (len(a), 3)
    assert np.array_equal(a.view()[:10], first) and np.array_equal(early, first)  # the old view is still valid
    assert np.array_equal(a.view()[-5:], np.full((5, 3), 1999))
    assert _mapped(a.data) == on_disk
    assert os.listdir(tmp_path) == []  # the file has no name: nothing to leave behind
    a.close()
    assert np.array_equal(a.view()[:10], first)  # arrays taken from it outlive close()


def test_scratch_dir_is_the_nearest_existing_directory(tmp_path: Path) -> None:
    assert scratch_dir(str(tmp_path / "a" / "b" / "store")) == str(tmp_path)
    assert scratch_dir(str(tmp_path)) == str(tmp_path)


def test_keyset_in_scratch_files_matches_the_heap_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyset_module, "SPILL_TAGS", 64)  # long runs go to scratch files at once
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 256, (20_000, 32), dtype=np.uint8)
    keys[:5000, :8] = 7  # many keys alike in their first bytes
    heap, disk = KeySet(), KeySet(str(tmp_path))
    for a in range(0, 15_000, 1_000):
        heap.add(keys[a : a + 1000])
        disk.add(keys[a : a + 1000])
        probe = keys[rng.integers(0, len(keys), 3000)]
        assert np.array_equal(disk.find(probe), heap.find(probe))
    assert np.array_equal(disk.find(keys), np.where(np.arange(len(keys)) < 15_000, np.arange(len(keys)), -1))
    assert any(_mapped(r) for r in disk._runs) and _mapped(disk._keys.data)
    assert os.listdir(tmp_path) == []


def _store_with_runs(path: Path, commits: int) -> actstore.ActivationStore:
    """A store of ``commits`` commits whose keys share their first 8 bytes across commits (equal index prefixes)."""
    store = actstore.create(path, {"x": Field((2,), "float32")})
    store.merge_policy = None  # keep the segments: only the index is merged
    for c in range(commits):
        keys = np.zeros((20, 32), np.uint8)
        keys[:, 0] = np.arange(20) % 5  # prefixes 0..4 in every commit
        keys[:, 8] = c
        keys[:, 9] = np.arange(20)
        store.append(keys, {"x": np.full((20, 2), c, np.float32)})
        store.commit()
    return store


def test_index_merge_keeps_equal_prefixes_in_row_order(tmp_path: Path) -> None:
    store = _store_with_runs(tmp_path / "s", MAX_INDEX_RUNS + 3)
    snap = store.snapshot
    assert len(snap.manifest.indexes) <= MAX_INDEX_RUNS
    run = snap.runs[0]
    assert bool((np.diff(run.prefix.astype(np.float64)) >= 0).all())
    for p in np.unique(run.prefix):  # equal prefixes: rows in the order they were committed
        rows = run.row[run.prefix == p]
        assert bool((np.diff(rows) > 0).all())
    keys = store.key_at(np.arange(len(store)))
    assert np.array_equal(store.lookup(keys), np.arange(len(store)))
    store.close()


def test_index_merge_refuses_a_run_out_of_order(tmp_path: Path) -> None:
    store = _store_with_runs(tmp_path / "s", 3)
    root, manifest = store.path, store.manifest
    store.close()
    run = manifest.indexes[1]
    prefix_file = Path(root) / "indexes" / run.id / "prefix" / "c" / "0"
    data = bytearray(prefix_file.read_bytes())
    data[0:8], data[8 * 19 : 8 * 20] = data[8 * 19 : 8 * 20], data[0:8]  # the smallest and the largest swapped
    prefix_file.write_bytes(bytes(data))
    assert not bool((np.diff(Snapshot(root, manifest).runs[1].prefix.astype(np.float64)) >= 0).all())
    with pytest.raises(CorruptStoreError, match="not sorted"):
        merge_runs(root, manifest)


def test_scratch_array_without_a_usable_directory_stays_in_the_heap(tmp_path: Path) -> None:
    a = ScratchArray(np.uint8, (32,), str(tmp_path / "missing"))
    a.append(np.ones((3, 32), np.uint8))
    assert a.view().tolist() == np.ones((3, 32), np.uint8).tolist() and not _mapped(a.data)
