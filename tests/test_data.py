"""ActivationDataset, batch gathering and collation, and DataLoader workers.

Stores are built directly (``tests/data_helpers.py``) the way precompute lays
them out; every check compares what the loader serves with the store's rows.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import actstore
from actstore import CorruptStoreError, Field
from actstore.format.keys import key
from actstore.training.collate import ActivationCollate, PaddedBatch, RowBatch, collate
from actstore.training.datasets import ActivationDataset
from tests import data_helpers as h

# --- items ----------------------------------------------------------------------------


@pytest.fixture
def store_path(tmp_path: Any) -> str:
    path = str(tmp_path / "s")
    h.make_store(path, 100, kind="dict", commit_every=40)  # three segments
    return path


def test_items_equal_store_rows_and_are_views(store_path: str) -> None:
    ds = ActivationDataset(store_path)
    store = ds.store  # the dataset's own handle: the same maps
    assert len(ds) == len(actstore.open(store_path)) == 100
    assert ds.fields == ["h", "label", "score"]
    for i in (0, 39, 40, 99, -1):
        item, row = ds[i], store[i % 100]
        assert set(item) == {"h", "label", "score"}
        for name in item:
            assert torch.equal(item[name], row[name])
            assert item[name].data_ptr() == row[name].data_ptr()  # both views of the same map: no copy
    assert ds[5]["h"].dtype == torch.float16 and ds[5]["h"].shape == (h.tokens_of(h.text(5)), h.HIDDEN)


def test_field_selection_and_unknown_field(store_path: str) -> None:
    ds = ActivationDataset(store_path, fields=["label"])
    assert set(ds[3]) == {"label"} and int(ds[3]["label"]) == 3 % 5
    with pytest.raises(KeyError) as e:
        ActivationDataset(store_path, fields=["h", "nope"])
    assert "nope" in str(e.value) and "label" in str(e.value) and "score" in str(e.value)
    with pytest.raises(IndexError):
        ds[100]


def test_dataloader_uses_getitems_once_per_batch(store_path: str) -> None:
    h.CountingDataset.item_calls = h.CountingDataset.items_calls = 0
    ds = h.CountingDataset(store_path)
    batches = list(DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate))
    assert h.CountingDataset.items_calls == len(batches) == 7
    assert h.CountingDataset.item_calls == 0
    labels = torch.cat([b["label"] for b in batches])
    assert sorted(labels.tolist()) == sorted(i % 5 for i in range(100))


def test_default_collate_still_works_on_fixed_fields(store_path: str) -> None:
    ds = ActivationDataset(store_path, fields=["label", "score"])
    batch = next(iter(DataLoader(ds, batch_size=10)))  # default_collate iterates the RowBatch
    assert batch["label"].tolist() == [i % 5 for i in range(10)]


# --- collation ------------------------------------------------------------------------


def test_collate_pads_with_mask_and_lengths(store_path: str) -> None:
    ds = ActivationDataset(store_path)
    store = actstore.open(store_path)
    rows = [3, 97, 41, 0, 55, 8]  # three segments, out of order
    batch = ActivationCollate(torch.float32, pad_to_multiple_of=8, pad_value=-1)(ds.__getitems__(rows))
    hb = batch["h"]
    assert isinstance(hb, PaddedBatch)
    lengths = [h.tokens_of(h.text(r)) for r in rows]
    width = -(-max(lengths) // 8) * 8
    assert hb.values.shape == (6, width, h.HIDDEN) and hb.values.dtype == torch.float32
    assert hb.lengths.tolist() == lengths
    assert hb.mask.dtype == torch.bool and hb.mask.sum(1).tolist() == lengths
    for i, r in enumerate(rows):
        n = lengths[i]
        assert torch.equal(hb.values[i, :n], store[r]["h"].float())
        assert bool(hb.mask[i, :n].all()) and not bool(hb.mask[i, n:].any())
        assert bool((hb.values[i, n:] == -1).all())
    # fixed fields: no padding, dtype cast only for floating fields
    assert batch["label"].shape == (6,) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [r % 5 for r in rows]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [r / 2 for r in rows]


def test_collate_keeps_store_dtype_and_int_masks(store_path: str) -> None:
    ds = ActivationDataset(store_path, fields=["h"])
    out = ActivationCollate(mask_dtype=torch.int64)(ds.__getitems__([1, 2]))["h"]
    assert out.values.dtype == torch.float16 and out.mask.dtype == torch.int64
    assert out.values.shape[1] == max(out.lengths.tolist())


def test_collate_bfloat16_store_to_float32(tmp_path: Any) -> None:
    path = str(tmp_path / "bf")
    h.make_store(path, 30, kind="tuple", dtype="bfloat16")
    ds = ActivationDataset(path)
    b = ActivationCollate(torch.float32)(ds.__getitems__([4, 25]))
    assert b["h"].values.dtype == torch.float32
    assert torch.equal(b["h"].values[1, : b["h"].lengths[1]], ds[25]["h"].float())


def test_collate_is_one_copy(tmp_path: Any) -> None:
    """The gather writes straight into the batch: no numpy temporary the size of the batch."""
    path = str(tmp_path / "big")
    with actstore.create(path, {"x": Field((256,), "float32"), "t": Field((None, 256), "float32")}) as s:
        n = 512
        s.append([key(i) for i in range(n)],
                 {"x": np.random.rand(n, 256).astype(np.float32), "t": [np.ones((i % 20 + 1, 256), np.float32) for i in range(n)]})
    ds = ActivationDataset(path)
    rows = np.random.default_rng(0).permutation(n)[:400]
    rb = ds.__getitems__(rows)
    collate(rb)  # map the files first
    tracemalloc.start()
    try:
        batch = collate(rb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    batch_bytes = batch["x"].nbytes + batch["t"].values.nbytes  # allocated by torch (not traced by tracemalloc)
    assert batch_bytes > 4_000_000
    assert peak < 200_000, f"numpy temporaries of {peak} bytes while gathering a {batch_bytes}-byte batch"
    assert torch.equal(batch["x"], torch.from_numpy(np.stack([ds[int(r)]["x"].numpy() for r in rows])))


def test_collate_in_worker_allocates_shared_memory(store_path: str, monkeypatch: Any) -> None:
    import actstore.training.collate as data

    monkeypatch.setattr(data, "get_worker_info", lambda: object())
    batch = collate(ActivationDataset(store_path).__getitems__([1, 2, 3]))
    assert batch["label"].is_shared() and batch["h"].values.is_shared() and batch["h"].mask.is_shared()


def test_collate_samples_and_passthrough() -> None:
    samples = [{"h": torch.ones(2, 3), "y": 1}, {"h": torch.ones(4, 3), "y": 2}]
    out = collate(samples)
    assert isinstance(out["h"], PaddedBatch) and out["h"].values.shape == (2, 4, 3)
    assert out["h"].lengths.tolist() == [2, 4] and out["y"].tolist() == [1, 2]
    fixed = ActivationCollate(torch.float64)([(torch.zeros(3), "a"), (torch.ones(3), "b")])
    assert fixed[0].dtype == torch.float64 and fixed[0].shape == (2, 3) and fixed[1] == ["a", "b"]
    already = {"h": torch.zeros(2, 3)}
    assert collate(already) is already  # an already-batched result passes through
    with pytest.raises(ValueError, match="first dimension"):
        collate([torch.zeros(2, 3), torch.zeros(2, 4)])


def test_rowbatch_is_a_sequence_of_items(store_path: str) -> None:
    ds = ActivationDataset(store_path, fields=["label"])
    rb = ds.__getitems__([7, 8])
    assert isinstance(rb, RowBatch) and len(rb) == 2
    assert [int(x["label"]) for x in rb] == [2, 3]


# --- snapshots, pickling, deletion ------------------------------------------------------


def test_dataset_sees_last_commit_of_a_store_being_written(tmp_path: Any) -> None:
    path = str(tmp_path / "w")
    h.make_fixed_store(path, 100, commit_every=100)
    writer = actstore.open(path, mode="a")
    writer.append([key(i) for i in range(100, 150)], {"x": np.zeros((50, 16), np.float32), "y": np.arange(100, 150)})
    ds = ActivationDataset(writer)  # pending rows are invisible
    assert len(ds) == 100
    writer.commit()
    assert len(ds) == 100 and len(ActivationDataset(path)) == 150  # a dataset is a snapshot
    writer.close()


def test_pickled_dataset_reopens_the_same_snapshot(tmp_path: Any) -> None:
    path = str(tmp_path / "p")
    h.make_fixed_store(path, 100, commit_every=100)
    ds = ActivationDataset(path)
    blob = pickle.dumps(ds)
    with actstore.open(path, mode="a") as w:
        w.append([key(i) for i in range(100, 120)], {"x": np.zeros((20, 16), np.float32), "y": np.arange(100, 120)})
    clone = pickle.loads(blob)
    assert clone._store is None  # opened lazily, on first use
    assert len(clone) == 100
    assert float(clone[42]["x"][0]) == 42.0


def test_store_deleted_under_running_loader_fails_cleanly(tmp_path: Any) -> None:
    path = str(tmp_path / "gone")
    h.make_fixed_store(path, 1000, commit_every=100)  # ten segment files, mapped lazily
    ds = ActivationDataset(path)
    loader = DataLoader(ds, batch_size=50, num_workers=2, collate_fn=collate, timeout=60,
                        multiprocessing_context=mp.get_context("fork"))
    it = iter(loader)
    seen = 0
    try:
        with pytest.raises((CorruptStoreError, RuntimeError)) as e:  # noqa: PT012 - the failure comes mid-iteration
            for batch in it:
                seen += len(batch["y"])
                if seen == 50:
                    shutil.rmtree(path)
        assert "missing" in str(e.value) or "no store" in str(e.value)
        assert 50 <= seen < 1000  # the batches already mapped were served
    finally:
        # After a worker raised, torch's shutdown waits 5 s per fork worker before killing it (plain torch
        # behaviour, not a hang); end them now to keep the test quick.
        for w in it._workers:  # type: ignore[attr-defined]
            w.terminate()
        del it


# --- DataLoader workers ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_under_each_start_method(tmp_path: Any, method: str) -> None:
    path = str(tmp_path / method)
    h.make_store(path, 60, kind="tuple", commit_every=25)
    ds = ActivationDataset(path)
    ds[0]  # the parent has mapped a segment: fork children inherit it, others re-open
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=h.worker_pid_collate, timeout=120,
                        multiprocessing_context=mp.get_context(method), persistent_workers=True)
    store = actstore.open(path)
    for _epoch in range(2):  # the same worker processes serve both epochs
        pids = set()
        got = []
        for batch in loader:
            pids.add(int(batch["pid"]))
            hb = batch["h"]
            assert hb.values.is_shared()  # built in shared memory by the worker
            for i in range(len(hb.lengths)):
                got.append(hb.values[i, : hb.lengths[i]])
        assert os.getpid() not in pids and len(pids) == 2
        assert len(got) == 60 and all(torch.equal(got[i], store[i]["h"]) for i in range(60))


def test_pin_memory_and_worker_count(store_path: str) -> None:
    ds = ActivationDataset(store_path, fields=["h", "label"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU-only torch warns that there is no accelerator to pin for
        loader = DataLoader(ds, batch_size=32, num_workers=3, pin_memory=True, collate_fn=ActivationCollate(torch.float32),
                            multiprocessing_context=mp.get_context("fork"))
        batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == 100
    assert isinstance(batches[0]["h"], PaddedBatch) and batches[0]["h"].values.dtype == torch.float32
    if torch.cuda.is_available():
        assert batches[0]["h"].values.is_pinned() and batches[0]["label"].is_pinned()
