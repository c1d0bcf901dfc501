"""Side values (labels, ids) belong to dataset positions: CachedDataset serves ``dataset[i]``'s own, always."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import actstore
from actstore import DatasetMismatchError, Field, MissingRowsError
from actstore.testing.models import tiny_mlp
from actstore.training.encoder import RecycledEncoder
from actstore.training.recycled import CachedDataset
from tests import data_helpers as h
from tests import dist_helpers

REPO = Path(__file__).resolve().parents[1]


def three() -> list[tuple[torch.Tensor, int]]:
    """``[(x0, 0), (x1, 5), (x0, 1)]``: a repeated input with another label."""
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    return [(x0, 0), (x1, 5), (x0, 1)]


def pre(model: nn.Module, data: Any, path: Path, **kw: Any) -> actstore.ActivationStore:
    return actstore.precompute(model, data, path, layers="1", batch_size=kw.pop("batch_size", 2), progress=False, **kw)


@contextlib.contextmanager
def forwards(module: nn.Module) -> Iterator[dict[str, int]]:
    seen = {"calls": 0}

    def hook(*_: Any) -> None:
        seen["calls"] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def labels_of(loader: Any) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


# --- one input, several labels -----------------------------------------------------------------------


def test_repeated_input_keeps_each_positions_label(tmp_path: Path) -> None:
    data = three()
    store = pre(tiny_mlp(), data, tmp_path / "s")
    assert len(store) == 2  # one row per distinct input
    ds = CachedDataset(data, store)
    assert [ds[i][1] for i in range(3)] == [0, 5, 1] and type(ds[2][1]) is int
    assert torch.equal(ds[0][0], ds[2][0])  # the same activations
    _, ys = actstore.collate(ds.__getitems__([0, 1, 2]))
    assert ys.tolist() == [0, 5, 1]
    assert ds.sides_checked == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_repeated_input_labels_through_a_dataloader(tmp_path: Path, workers: int) -> None:
    data = three()
    pre(tiny_mlp(), data, tmp_path / "s")
    ds = CachedDataset(data, tmp_path / "s")
    assert labels_of(DataLoader(ds, batch_size=2, num_workers=workers)) == [0, 5, 1]
    assert labels_of(DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=actstore.collate)) == [0, 5, 1]


def test_two_ranks_keep_each_positions_label(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "actstore", "precompute", "--model",
           "tests.dist_helpers:model", "--data", "tests.dist_helpers:repeats_with_own_labels", "--layer", "net.1",
           "--batch-size", "4", "-q", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = dist_helpers.repeats_with_own_labels()
    store = actstore.open(out)
    store.verify()
    assert len(store) == 48  # the repeats share rows
    want = [y for _, y in data]
    assert store.view_columns("dataset")["item_1"].tolist() == want
    ds = CachedDataset(data, store)
    assert [ds[i][1] for i in range(len(data))] == want
    assert labels_of(DataLoader(ds, batch_size=8)) == want


# --- relabelled datasets -------------------------------------------------------------------------------


def test_relabelled_dataset_is_refused_and_a_rerun_rewrites_labels_without_a_forward(tmp_path: Path) -> None:
    model, data = tiny_mlp(), three()
    store = pre(model, data, tmp_path / "s")
    rows = store.view("dataset").copy()
    relabelled = [data[0], (data[1][0], 7), data[2]]
    with pytest.raises(DatasetMismatchError, match=r"dataset\[1\].*rerun precompute"):
        CachedDataset(relabelled, tmp_path / "s")
    with forwards(model) as seen:
        again = pre(model, relabelled, tmp_path / "s")
    assert seen["calls"] == 0 and len(again) == 2  # nothing recomputed
    assert again.view("dataset").tolist() == rows.tolist()
    ds = CachedDataset(relabelled, again)
    assert [ds[i][1] for i in range(3)] == [0, 7, 1]


def test_relabelled_expensive_items_are_caught_by_the_spot_check(tmp_path: Path) -> None:
    big = [(torch.full((5000,), float(i)), i % 2) for i in range(20)]
    model = nn.Sequential(nn.Linear(5000, 3), nn.ReLU())
    actstore.precompute(model, big, tmp_path / "s", layers="1", batch_size=8, progress=False)
    ds = CachedDataset(big, tmp_path / "s")
    assert ds.check_mode == "spot" and ds.sides_checked == 8
    with pytest.raises(DatasetMismatchError, match="relabelled since precompute"):
        CachedDataset([(x, 1 - y) for x, y in big], tmp_path / "s")


def test_a_label_of_another_type_is_refused(tmp_path: Path) -> None:
    data = three()
    pre(tiny_mlp(), data, tmp_path / "s")
    with pytest.raises(DatasetMismatchError, match="no longer matches the store"):
        CachedDataset([(x, str(y)) for x, y in data], tmp_path / "s")


def test_str_and_array_side_values_per_position(tmp_path: Path) -> None:
    x = three()
    data = [{"x": x[0][0], "name": "a", "vec": np.arange(2)}, {"x": x[1][0], "name": "bé", "vec": np.arange(2) + 1},
            {"x": x[0][0], "name": "", "vec": np.arange(2) + 2}]
    pre(tiny_mlp(), data, tmp_path / "s")
    ds = CachedDataset(data, tmp_path / "s")
    assert [ds[i]["name"] for i in range(3)] == ["a", "bé", ""]
    assert [ds[i]["vec"].tolist() for i in range(3)] == [[0, 1], [1, 2], [2, 3]]
    batch = actstore.collate(ds.__getitems__([2, 1]))
    assert batch["name"] == ["", "bé"] and batch["vec"].tolist() == [[2, 3], [1, 2]]
    renamed = [dict(d, name="z") if i == 2 else d for i, d in enumerate(data)]
    with pytest.raises(DatasetMismatchError, match=r"dataset\[2\]"):
        CachedDataset(renamed, tmp_path / "s")


# --- index="keys" and stores without side values ------------------------------------------------------


def test_index_keys_over_a_recycled_encoder_store_serves_the_datasets_labels(tmp_path: Path) -> None:
    path = str(tmp_path / "enc")
    texts = [h.text(i) for i in range(6)]
    with RecycledEncoder(h.PaddedFrozen(), path, append=True) as enc:
        enc(texts)
    pairs = [(t, 10 + i) for i, t in enumerate(texts)] + [(texts[0], 99)]
    ds = CachedDataset(pairs, path, index="keys")  # input= inferred: element 0 of a tuple item
    assert ds.input == 0 and [ds[i][1] for i in range(7)] == [10, 11, 12, 13, 14, 15, 99]
    assert CachedDataset(pairs, path, index="keys", input=0)[6][1] == 99
    got = [int(y) for _, ys in DataLoader(ds, batch_size=3, num_workers=2) for y in ys]
    assert got == [10, 11, 12, 13, 14, 15, 99]
    dicts = [{"text": t, "label": y, "id": f"q{y}"} for t, y in pairs]
    dds = CachedDataset(dicts, path, index="keys")
    assert [(dds[i]["label"], dds[i]["id"]) for i in (0, 6)] == [(10, "q10"), (99, "q99")]
    batch = actstore.collate(dds.__getitems__([6, 1]))
    assert batch["label"].tolist() == [99, 11] and batch["id"] == ["q99", "q11"]


def test_index_keys_with_missing_rows_gives_the_right_advice(tmp_path: Path) -> None:
    path = str(tmp_path / "enc")
    with RecycledEncoder(h.PaddedFrozen(), path, append=True) as enc:
        enc([h.text(0)])
    with pytest.raises(MissingRowsError, match="RecycledEncoder") as err:
        CachedDataset([(h.text(0), 1), (h.text(1), 2)], path, index="keys")
    assert "actstore.precompute" not in str(err.value)


def test_index_keys_over_a_precomputed_store_serves_the_datasets_labels(tmp_path: Path) -> None:
    data = three()
    pre(tiny_mlp(), data, tmp_path / "s")
    other = [(data[2][0], 42), (data[1][0], 43)]  # another dataset over the same inputs
    ds = CachedDataset(other, tmp_path / "s", index="keys")
    assert [ds[i][1] for i in range(2)] == [42, 43]
    assert actstore.collate(ds.__getitems__([0, 1]))[1].tolist() == [42, 43]


# --- stores written before format version 3 ----------------------------------------------------------


def legacy_store(model: nn.Module, data: list[tuple[torch.Tensor, int]], path: Path, tmp: Path) -> None:
    """A store as precompute wrote it before format 3: labels as a row field (the first position's), a plain view."""
    new = pre(model, data, tmp / "new")
    rows = np.asarray(new.view("dataset"))
    first = {}
    for p, r in enumerate(rows.tolist()):
        first.setdefault(r, data[p][1])
    with actstore.create(path, {**new.fields, "item_1": Field((), "int64")}, fingerprint=new.fingerprint,
                         attrs=dict(new.attrs)) as w:
        w.append(new.key_at(np.arange(len(new))), {"1": new.gather(np.arange(len(new)))["1"],
                                                  "item_1": torch.tensor([first[r] for r in range(len(new))])})
        w.set_view("dataset", rows)
    assert actstore.open(path).manifest.version == 1


def test_old_format_store_is_served_and_checked(tmp_path: Path) -> None:
    model, data = tiny_mlp(), three()
    legacy_store(model, data, tmp_path / "old", tmp_path)
    agreeing = [data[0], data[1], (data[2][0], data[0][1])]  # what the old store can serve
    ds = CachedDataset(agreeing, tmp_path / "old")
    assert [ds[i][1] for i in range(3)] == [0, 5, 0] and ds.sides_checked == 3
    with pytest.raises(DatasetMismatchError, match=r"dataset\[2\].*rerun precompute"):
        CachedDataset(data, tmp_path / "old")  # position 2's own label is not in the old store
    with forwards(model) as seen:
        again = pre(model, data, tmp_path / "old")  # a rerun adds the per-position labels, computes nothing
    assert seen["calls"] == 0 and again.manifest.version == 3 and "item_1" in again.fields
    ds = CachedDataset(data, again)
    assert [ds[i][1] for i in range(3)] == [0, 5, 1]
    again.verify()


def test_a_store_without_a_record_serves_the_items_labels_by_position(tmp_path: Path) -> None:
    """A store made with append and set_view (no precompute record, no side values): labels read from the items."""
    data = three()
    with actstore.create(tmp_path / "s", {"h": Field((6,), "float32")}) as w:
        w.append([actstore.key(data[0][0]), actstore.key(data[1][0])], {"h": torch.stack([data[0][0], data[1][0]])})
        w.set_view("dataset", [0, 1, 0])
    ds = CachedDataset(data, tmp_path / "s")
    assert ds.input == 0 and [ds[i][1] for i in range(3)] == [0, 5, 1]
    assert labels_of(DataLoader(ds, batch_size=2, num_workers=2)) == [0, 5, 1]


def test_a_part_precompute_never_saw_is_refused_until_it_runs_again(tmp_path: Path) -> None:
    model = tiny_mlp()
    vecs = [torch.randn(6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    items = [{"x": v, "label": i % 3} for i, v in enumerate(vecs)]
    actstore.precompute(model, items, tmp_path / "s", layers="1", progress=False).close()
    grown = [{**it, "weight": 0.5 + i} for i, it in enumerate(items)]
    with pytest.raises(DatasetMismatchError, match=r"items have parts \['weight'\] that precompute did not see"):
        CachedDataset(grown, tmp_path / "s")  # its value would be served as None
    store = actstore.precompute(model, grown, tmp_path / "s", layers="1", progress=False, overwrite=True)
    ds = CachedDataset(grown, store)
    assert [ds[i]["weight"] for i in range(8)] == [0.5 + i for i in range(8)]
    assert [ds[i]["label"] for i in range(8)] == [i % 3 for i in range(8)]
