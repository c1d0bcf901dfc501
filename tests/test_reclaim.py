"""Reclaiming compaction: rows no dataset position references any more are dropped (issue 20, item 1's last sentence)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import Field
from actstore.cli import main as cli_main
from actstore.errors import StoreError
from actstore.storage.local import LocalBackend
from actstore.testing.models import tiny_mlp
from tests.precompute_helpers import vectors

FIELDS = {"h": Field((4,), "float16"), "tok": Field((None, 3), "float32"), "q": Field((5,), "float32", quantize="int8")}


def batch(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
    """Rows ``lo .. hi-1``: each row's values depend on its number only (ragged lengths 0..3)."""
    rngs = [np.random.default_rng(i) for i in range(lo, hi)]
    return [actstore.key(i) for i in range(lo, hi)], {
        "h": np.array([g.standard_normal(4) for g in rngs], np.float16).reshape(-1, 4),
        "tok": [g.standard_normal((i % 4, 3)).astype(np.float32) for g, i in zip(rngs, range(lo, hi), strict=True)],
        "q": np.array([g.standard_normal(5) for g in rngs], np.float32).reshape(-1, 5),
    }


def make(path: Path, sizes: list[int]) -> None:
    """A store of ``sizes`` commits (one segment each), rows 0.. in order."""
    lo = 0
    with actstore.create(path, FIELDS) as store:
        for n in sizes:
            store.append(*batch(lo, lo + n))
            store.commit()
            lo += n


def rows_of(store: actstore.ActivationStore, rows: Any) -> dict[str, Any]:
    got = store.gather(np.asarray(rows, np.int64))
    return {"h": got["h"].clone(), "tok": [t.clone() for t in got["tok"]], "q": got["q"].clone()}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return torch.equal(a["h"], b["h"]) and torch.equal(a["q"], b["q"]) and len(a["tok"]) == len(b["tok"]) and all(
        torch.equal(x, y) for x, y in zip(a["tok"], b["tok"], strict=True))


# -- store.compact(drop=...) -------------------------------------------------------------------------------


def test_compact_drop_renumbers_rows_views_and_keys(tmp_path) -> None:
    path = tmp_path / "s"
    make(path, [7, 5, 9])
    drop = [0, 3, 7, 8, 20]
    keep = [r for r in range(21) if r not in drop]
    with actstore.open(path, mode="a") as store:
        before = rows_of(store, keep)
        store.set_view("v", np.array([keep[4], -1, keep[0], keep[-1]], np.int64))
        store.commit()
        report = store.compact(drop=drop)
        assert "dropping 5 rows" in str(report) and not report.noop
        assert len(store) == 16 and len(store.manifest.segments) == 1 and store.manifest.renumbered == 1
        assert store.manifest.version == 3  # readers that cannot tell renumbered rows refuse it
        assert same(rows_of(store, range(16)), before)  # every kept row, bit for bit, in order
        assert store.view("v").tolist() == [4, -1, 0, 15]
        assert store.lookup([actstore.key(r) for r in keep]).tolist() == list(range(16))
        assert (store.lookup([actstore.key(r) for r in drop]) == -1).all()
    with actstore.open(path) as store:
        store.verify()
        assert store.manifest.renumbered == 1 and len(store) == 16


def test_compact_drop_of_a_single_segment_and_of_everything(tmp_path) -> None:
    make(tmp_path / "s", [6])
    with actstore.open(tmp_path / "s", mode="a") as store:
        store.compact(drop=[5])
        assert len(store) == 5
        store.compact(drop=np.arange(5))
        assert len(store) == 0 and store.manifest.segments == ()
        store.append(*batch(100, 102))  # still a store
        store.commit()
    with actstore.open(tmp_path / "s") as store:
        store.verify()
        assert len(store) == 2


def test_compact_drop_refuses_rows_a_view_references(tmp_path) -> None:
    make(tmp_path / "s", [4, 4])
    with actstore.open(tmp_path / "s", mode="a") as store:
        store.set_view("dataset", np.array([1, 6], np.int64))
        store.commit()
        generation = store.generation
        with pytest.raises(ValueError, match="row 6 is referenced by view 'dataset'"):
            store.compact(drop=[0, 6])
        assert store.generation == generation and len(store) == 8


def test_a_failure_before_publish_leaves_the_store_as_before(tmp_path, monkeypatch) -> None:
    path = tmp_path / "s"
    make(path, [5, 5])
    with actstore.open(path, mode="a") as store:
        store.set_view("dataset", np.arange(2, 10))
        store.commit()
        all_rows = rows_of(store, range(10))
        generation = store.generation

        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(LocalBackend, "publish", fail)
        with pytest.raises(OSError):
            store.compact(drop=[0, 1])
        monkeypatch.undo()
        assert store.generation == generation and len(store) == 10
    with actstore.open(path, mode="a") as store:  # (a writer deletes what a failed commit left)
        assert store.generation == generation and len(store) == 10 and store.manifest.renumbered == 0
        assert same(rows_of(store, range(10)), all_rows) and store.view("dataset").tolist() == list(range(2, 10))
        store.verify()
        on_disk = sorted(p.name for p in (path / "segments").iterdir() if p.is_dir())
        assert on_disk == sorted(s.id for s in store.manifest.segments)  # the partial merged segment is gone
        store.compact(drop=[0, 1])  # and it works afterwards
        assert len(store) == 8 and same(rows_of(store, range(8)), rows_of_dict(all_rows, range(2, 10)))


def rows_of_dict(rows: dict[str, Any], which: range) -> dict[str, Any]:
    return {"h": rows["h"][list(which)], "q": rows["q"][list(which)], "tok": [rows["tok"][i] for i in which]}


def test_a_reader_of_an_older_commit_never_reads_renumbered_rows(tmp_path) -> None:
    path = tmp_path / "s"
    make(path, [5, 5])
    with actstore.open(path, mode="a") as store:
        store.set_view("dataset", np.arange(1, 10))
        store.commit()
    reader = actstore.open(path)
    blob = pickle.dumps(reader)  # what a DataLoader worker receives: this commit's snapshot
    with actstore.open(path, mode="a") as store:
        store.compact(drop=[0])
    with pytest.raises(StoreError, match="renumbered"):
        pickle.loads(blob)  # its views and index runs are gone, and the newer commit numbers rows otherwise
    with pytest.raises(StoreError):  # segments it had not mapped are gone: not relocated into shifted rows
        reader.gather(np.array([7]))
    reader.close()


def test_cli_compact_drop_unreferenced(tmp_path, capsys) -> None:
    path = tmp_path / "s"
    make(path, [6, 6])
    with actstore.open(path, mode="a") as store:
        store.set_view("dataset", np.array([2, 3, 11], np.int64))
        store.commit()
    assert cli_main(["compact", str(path)]) == 0
    with actstore.open(path) as store:
        assert len(store) == 12
    assert cli_main(["compact", str(path), "--drop-unreferenced"]) == 0
    assert "dropping 9 rows" in capsys.readouterr().out
    with actstore.open(path) as store:
        assert len(store) == 3 and store.view("dataset").tolist() == [0, 1, 2]
        store.verify()


# -- precompute's final merge ------------------------------------------------------------------------------


def changed(data: list[tuple[torch.Tensor, int]], which: range) -> list[tuple[torch.Tensor, int]]:
    out = list(data)
    for i in which:
        out[i] = (data[i][0] + 100.0, data[i][1])
    return out


def test_rerun_after_changing_items_reclaims_their_old_rows(tmp_path) -> None:
    model, data = tiny_mlp(), vectors(40)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers="1", progress=False, commit_every_rows=16).close()
    new = changed(data, range(5, 15))
    store = actstore.precompute(model, new, path, layers="1", progress=False, commit_every_rows=16)
    assert len(store) == 40  # the dataset's distinct inputs: the 10 old rows are gone
    assert store.manifest.renumbered == 1 and len(store.manifest.segments) == 1
    fresh = actstore.precompute(model, new, tmp_path / "fresh", layers="1", progress=False)
    view = store.view("dataset")
    assert torch.equal(store.gather(view)["1"], fresh.gather(fresh.view("dataset"))["1"])
    assert store.lookup([actstore.key(x) for x, _ in new]).tolist() == view.tolist()
    assert (store.lookup([actstore.key(x) for x, _ in data[5:15]]) == -1).all()
    store.verify()
    ds = actstore.CachedDataset(new, store)
    assert torch.equal(torch.stack([ds[i][0] for i in range(40)]), fresh.gather(fresh.view("dataset"))["1"])
    # the view's columns (each position's label and item key) survive the renumbering unchanged
    assert store.manifest.views["dataset"].has_columns
    assert [ds[i][1] for i in range(40)] == [y for _, y in new]
    assert torch.equal(torch.as_tensor(store.view_columns("dataset").item_key),
                       torch.as_tensor(fresh.view_columns("dataset").item_key))
    store.close()
    fresh.close()


def test_rerun_with_reclaim_false_keeps_every_row(tmp_path) -> None:
    model, data = tiny_mlp(), vectors(40)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers="1", progress=False).close()
    with actstore.precompute(model, changed(data, range(10)), path, layers="1", progress=False,
                             reclaim=False) as store:
        assert len(store) == 50 and store.manifest.renumbered == 0


def test_rerun_keeps_rows_that_no_view_ever_referenced(tmp_path) -> None:
    """Rows appended without a view (a RecycledEncoder's cache, another run's) and rows another view names survive."""
    model, data = tiny_mlp(), vectors(40)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers="1", progress=False).close()
    extra = [torch.full((6,), float(i)) for i in range(5)]
    with actstore.open(path, mode="a") as store:
        out = model[:2](torch.stack(extra)).detach()
        store.append([actstore.key(x) for x in extra], {"1": out})  # (labels live in the view, not in rows)
        store.set_view("mine", store.lookup([actstore.key(data[5][0])]))  # one of the rows about to change
        store.commit()
        kept_value = store.gather(store.lookup([actstore.key(x) for x in extra]))["1"].clone()
    store = actstore.precompute(model, changed(data, range(5, 15)), path, layers="1", progress=False)
    assert len(store) == 40 + 5 + 1  # the dataset's inputs, the 5 extra rows, the row "mine" names
    rows = store.lookup([actstore.key(x) for x in extra])
    assert (rows >= 0).all() and torch.equal(store.gather(rows)["1"], kept_value)
    assert store.view("mine").tolist() == store.lookup([actstore.key(data[5][0])]).tolist()
    assert (store.lookup([actstore.key(x) for x, _ in data[6:15]]) == -1).all()
    store.verify()
    store.close()


def test_cli_precompute_no_reclaim(tmp_path) -> None:
    import tests.precompute_helpers as helpers

    h = helpers.__file__
    args = ["precompute", "--model", f"{h}:mlp_factory", "--layer", "1", "-q", "--out", str(tmp_path / "s")]
    assert cli_main([*args, "--data", f"{h}:data_factory"]) == 0
    assert cli_main([*args, "--data", f"{__file__}:shifted_data", "--no-reclaim"]) == 0
    with actstore.open(tmp_path / "s") as store:
        assert len(store) == 50
    assert cli_main([*args, "--data", f"{__file__}:shifted_data"]) == 0
    with actstore.open(tmp_path / "s") as store:  # no reclaim: the previous view named the shifted rows' rows
        assert len(store) == 50


def shifted_data() -> list[tuple[torch.Tensor, int]]:
    return changed(vectors(40), range(10))


def test_a_cached_dataset_refuses_rows_renumbered_after_it_was_built(tmp_path) -> None:
    model, data = tiny_mlp(), vectors(40)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers="1", progress=False, commit_every_rows=16).close()
    ds = actstore.CachedDataset(data, path)
    want = ds[20][0].clone()
    actstore.precompute(model, changed(data, range(5, 15)), path, layers="1", progress=False,
                        commit_every_rows=16).close()  # reclaims the 10 old rows: every later row moves
    assert torch.equal(ds[20][0], want)  # its handle still reads the commit it was built from
    assert ds.store.refresh() and ds.store.manifest.renumbered == 1
    assert not torch.equal(ds.store.gather(ds.rows[[20]])["1"][0], want)  # row 20's number now holds another row
    for serve in (lambda: ds[20], lambda: ds.__getitems__([0, 20])):
        with pytest.raises(StoreError, match="renumbered since this dataset was built"):
            serve()
    again = actstore.CachedDataset(changed(data, range(5, 15)), path)
    assert torch.equal(again[20][0], want)  # built again: the same sample's row, under its new number
