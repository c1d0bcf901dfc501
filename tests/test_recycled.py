"""CachedDataset (the dataset drop-in) and RecycledEncoder (the frozen-module drop-in)."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import actstore
from actstore import DatasetMismatchError, Field, MissingRowsError, StaleStoreError, StoreError, StoreNotFoundError
from actstore.format.keys import fingerprint, key
from actstore.training.collate import ActivationCollate, PaddedBatch, collate
from actstore.training.encoder import RecycledEncoder, output_rows
from actstore.training.recycled import CachedDataset
from tests import data_helpers as h

# --- CachedDataset --------------------------------------------------------------------------


class NoInputs:
    """A dataset whose items explode when read: proves CachedDataset does not read them."""

    def __init__(self, data: list[Any]) -> None:
        self.data = data
        self.armed = False
        self.reads = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        if self.armed:
            raise AssertionError(f"dataset[{i}] was read")
        return self.data[i]


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "bare"])
def test_items_have_the_original_structure(tmp_path: Any, kind: str) -> None:
    path = str(tmp_path / kind)
    data = NoInputs(h.make_store(path, 50, kind=kind))
    ds = CachedDataset(data, path)
    data.armed = True  # from here on, no item of the original may be read
    assert len(ds) == 50
    for i in (0, 17, 49):
        orig, item = data.data[i], ds[i]
        acts = h.embed(h.text(i)).half()
        if kind == "bare":
            assert torch.equal(item, acts)
            continue
        assert type(item) is type(orig)
        if kind == "dict":
            assert list(item) == list(orig)
            assert torch.equal(item["text"], acts)
            assert item["label"] == orig["label"] and type(item["label"]) is int
            assert item["score"] == orig["score"] and type(item["score"]) is float
        else:
            assert len(item) == len(orig) and torch.equal(item[0], acts)
            assert item[1] == orig[1] and type(item[1]) is int
    loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=ActivationCollate(torch.float32))
    n = 0
    for batch in loader:
        hb = batch if kind == "bare" else (batch["text"] if kind == "dict" else batch[0])
        assert isinstance(hb, PaddedBatch) and hb.values.dtype == torch.float32
        if kind == "namedtuple":
            assert type(batch) is h.Pair and batch.label.dtype == torch.int64
        n += len(hb.lengths)
    assert n == 50


def test_batch_matches_items(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 40, kind="dict")
    ds = CachedDataset(data, path)
    idx = [5, 39, 0, 22]
    batch = collate(ds.__getitems__(idx))
    assert batch["label"].tolist() == [data[i]["label"] for i in idx]
    assert batch["score"].tolist() == [data[i]["score"] for i in idx]
    for j, i in enumerate(idx):
        assert torch.equal(batch["text"].values[j, : batch["text"].lengths[j]], ds[i]["text"])


def test_length_change_is_an_error(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 30)
    with pytest.raises(DatasetMismatchError, match="30"):
        CachedDataset(data[:29], path)
    with pytest.raises(DatasetMismatchError):
        CachedDataset(data + [("extra", 1)], path)


def test_changed_items_are_caught_by_the_spot_check(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 30)
    shuffled = data[::-1]  # same length, reordered
    with pytest.raises(DatasetMismatchError, match="changed since precompute"):
        CachedDataset(shuffled, path)
    # matched by content instead of by position
    ds = CachedDataset(shuffled, path, index="keys")
    assert torch.equal(ds[0][0], h.embed(h.text(29)).half()) and ds[0][1] == 29 % 5


def test_missing_rows_error_says_how_many_and_how_to_fill(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 30, missing=(3, 7, 11))
    with pytest.raises(MissingRowsError) as e:
        CachedDataset(data, path)
    msg = str(e.value)
    assert "3 of 30" in msg and "actstore.precompute(" in msg and "actstore precompute" in msg and "[3, 7, 11]" in msg


def test_fallback_computes_the_missing_rows(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 30, missing=(3, 7, 11))
    frozen = h.Frozen()
    ds = CachedDataset(data, path, fallback=frozen)
    assert ds.missing == 3
    item = ds[7]
    assert torch.equal(item[0], h.embed(h.text(7))) and item[1] == 7 % 5
    batch = collate(ds.__getitems__([2, 3, 4, 11]))
    assert frozen.calls == 2 and frozen.rows == 3  # one call per batch, only for the misses
    hb = batch[0]
    for j, i in enumerate([2, 3, 4, 11]):
        assert torch.allclose(hb.values[j, : hb.lengths[j]].float(), h.embed(h.text(i)), atol=1e-2)
    assert batch[1].tolist() == [2, 3, 4, 11 % 5]


def test_cached_dataset_with_spawn_workers(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 40, kind="dict")
    ds = CachedDataset(data, path)
    loader = DataLoader(ds, batch_size=10, num_workers=1, collate_fn=collate, timeout=120,
                        multiprocessing_context=mp.get_context("spawn"))
    labels = sorted(int(x) for b in loader for x in b["label"])
    assert labels == sorted(d["label"] for d in data)


# --- RecycledEncoder ------------------------------------------------------------------------


def test_first_epoch_fills_later_epochs_read(tmp_path: Any) -> None:
    path = str(tmp_path / "enc")
    texts = [h.text(i) for i in range(40)]
    frozen = h.PaddedFrozen()
    enc = RecycledEncoder(frozen, path, append=True, commit_every_rows=25)
    assert enc.store is None  # created on the first miss
    out = enc(texts[:20])
    assert isinstance(out, PaddedBatch) and (enc.hits, enc.misses) == (0, 20)
    for i, t in enumerate(texts[:20]):
        assert torch.equal(out.values[i, : out.lengths[i]], h.embed(t))
    out = enc(texts[10:30])  # 10 rows pending (not committed yet) + 10 new; commit at 25+
    assert (enc.hits, enc.misses) == (10, 30) and frozen.rows == 30
    assert enc.store is not None and len(enc.store) == 30 and enc.store.pending == 0
    enc(texts)  # 30 stored, 10 new
    assert (enc.hits, enc.misses) == (40, 40)
    enc.close()
    store = actstore.open(path)
    assert len(store) == 40 and store.fingerprint == fingerprint(frozen)
    assert torch.equal(store.get(key(texts[33]))["activations"], h.embed(texts[33]))

    again = RecycledEncoder(h.PaddedFrozen(), path)  # read-only: a later epoch
    out = again(list(reversed(texts)))
    assert again.hit_rate == 1.0 and again.frozen.calls == 0
    assert torch.equal(out.values[0, : out.lengths[0]], h.embed(texts[-1]))
    keyed = again(keys=[key(t) for t in texts[:3]])  # keys alone are enough when every key is stored
    assert keyed.values.shape[0] == 3
    with pytest.raises(MissingRowsError, match="1 of 1"):
        again(keys=[key("never seen")])


def test_duplicates_in_a_batch_are_computed_once(tmp_path: Any) -> None:
    frozen = h.Frozen()
    enc = RecycledEncoder(frozen, str(tmp_path / "d"), append=True)
    out = enc(["a b", "a b", "c"])
    assert frozen.rows == 2 and enc.misses == 2 and enc.hits == 1
    assert torch.equal(out.values[0], out.values[1])
    enc.close()
    assert len(actstore.open(str(tmp_path / "d"))) == 2


def test_fixed_outputs_and_dtype(tmp_path: Any) -> None:
    class Pool(torch.nn.Module):
        def forward(self, texts: list[str]) -> torch.Tensor:
            return torch.stack([h.pooled(t) for t in texts])

    with RecycledEncoder(Pool(), str(tmp_path / "f"), append=True, store_dtype="float16", dtype=torch.float32) as enc:
        a = enc([h.text(i) for i in range(5)])
        enc.commit()
        b = enc([h.text(i) for i in range(5)])
    assert a.shape == b.shape == (5, h.HIDDEN) and b.dtype == torch.float32
    assert torch.allclose(a, b, atol=0.05) and enc.hit_rate == 0.5
    assert actstore.open(str(tmp_path / "f")).fields["activations"].dtype == "float16"


def test_encoder_over_a_precomputed_store(tmp_path: Any) -> None:
    path = str(tmp_path / "p")
    h.make_store(path, 20, kind="tuple", keys="inputs")  # fields h + label: the encoder serves h
    frozen = h.Frozen()
    enc = RecycledEncoder(frozen, path)
    assert enc.names == ["h"]
    out = enc([h.text(3), "not stored"])
    assert (enc.hits, enc.misses) == (1, 1) and frozen.rows == 1
    assert torch.equal(out.values[0, : out.lengths[0]], h.embed(h.text(3)).half())
    with pytest.raises(StoreError, match="exactly"):
        RecycledEncoder(frozen, path, append=True)  # cannot append rows without their labels


def test_append_needs_a_writable_store_and_a_store_must_exist(tmp_path: Any) -> None:
    path = str(tmp_path / "p")
    h.make_fixed_store(path, 10)
    with pytest.raises(StoreError, match="writable"):
        RecycledEncoder(h.Frozen(), actstore.open(path), append=True)
    with pytest.raises(StoreNotFoundError, match="append=True"):
        RecycledEncoder(h.Frozen(), str(tmp_path / "nothing"))


def test_stale_store_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    with RecycledEncoder(h.Frozen(), path, append=True) as enc:
        enc(["x y"])
    other = h.Frozen()
    with torch.no_grad():
        other.scale.fill_(2.0)
    with pytest.raises(StaleStoreError):
        RecycledEncoder(other, path)
    RecycledEncoder(other, path, check_fingerprint=False)


def test_recycled_encoder_as_cached_dataset_fallback(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    texts = [h.text(i) for i in range(12)]
    with RecycledEncoder(h.Frozen(), path, append=True) as enc:
        enc(texts[:8])
    data = [(t, i) for i, t in enumerate(texts)]
    ds = CachedDataset(data, path, index="keys", input=0, side={}, fallback=RecycledEncoder(h.Frozen(), path))
    assert ds.missing == 4
    item = ds[10]
    assert torch.equal(item[0], h.embed(texts[10])) and item[1] is None  # the label was not stored


def test_output_rows_forms() -> None:
    rows = [torch.ones(2, 3), torch.ones(4, 3)]
    rb = actstore.RaggedBatch.from_list(rows)
    padded, mask = rb.to_padded()
    for form in (rows, rb, (padded, mask), PaddedBatch(padded, mask, rb.lengths)):
        ragged: dict[str, bool] = {}
        out = output_rows(form, ["h"], 2, ragged)
        assert [r.shape for r in out["h"]] == [(2, 3), (4, 3)] and ragged["h"]
    assert [r.shape for r in output_rows({"a": torch.zeros(2, 5)}, ["a"], 2)["a"]] == [(5,), (5,)]
    with pytest.raises(ValueError, match="3 rows"):
        output_rows(torch.zeros(3, 2), ["h"], 2)
    with pytest.raises(TypeError, match="dict"):
        output_rows(torch.zeros(2, 2), ["a", "b"], 2)
    with pytest.raises(KeyError):
        output_rows({"a": torch.zeros(2, 2)}, ["b"], 2)


def test_training_step_through_the_encoder(tmp_path: Any) -> None:
    """An nn.Sequential-like use: the head trains, the frozen part never does."""
    frozen = h.Frozen()
    enc = RecycledEncoder(frozen, str(tmp_path / "t"), append=True)
    head = torch.nn.Linear(h.HIDDEN, 1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(2):
        enc.train()
        assert not frozen.training
        hidden, mask, _ = enc([h.text(i) for i in range(8)])
        loss = head(hidden.float()).squeeze(-1)[mask].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert enc.hits == 8 and enc.misses == 8 and frozen.scale.grad is None
    assert np.isfinite(float(loss.detach()))


# --- over stores made by actstore.precompute -------------------------------------------------


def test_cached_dataset_over_a_precompute_store(tmp_path: Any) -> None:
    from actstore.precompute.api import precompute

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, generator=gen), i % 3, f"id-{i}") for i in range(30)]
    store = precompute(model, data, tmp_path / "t", layers=["1", "2"], progress=False)
    ds = CachedDataset(data, store)
    assert ds.fields == ["1", "2"]
    item = ds[7]
    with torch.no_grad():
        assert torch.allclose(item[0]["1"], model[:2](data[7][0]), atol=1e-6)  # batched vs single: rounding
        assert torch.allclose(item[0]["2"], model(data[7][0]), atol=1e-6)
    assert item[1:] == (1, "id-7") and type(item) is tuple
    batch = collate(ds.__getitems__([3, 4]))
    assert batch[0]["2"].shape == (2, 2) and batch[1].tolist() == [0, 1] and batch[2] == ["id-3", "id-4"]
    assert pickle.loads(pickle.dumps(ds)).dataset is None  # nothing missing: the original is not shipped

    dicts = [{"x": torch.randn(4, generator=gen), "label": i, "junk": object()} for i in range(10)]
    store2 = precompute(model, dicts, tmp_path / "d", layers="1", input="x", side_fields={"junk": None}, progress=False)
    item = CachedDataset(dicts, store2)[4]
    assert list(item) == ["x", "label", "junk"] and item["label"] == 4 and item["junk"] is None  # dropped column

    def rounded(x: torch.Tensor) -> bytes:
        return key(x.numpy().round(3))

    store3 = precompute(model, data, tmp_path / "k", layers="1", key_fn=rounded, progress=False)
    with pytest.raises(ValueError, match="key_fn"):
        CachedDataset(data, store3)
    assert len(CachedDataset(data, store3, key_fn=rounded)) == 30


def test_encoder_reads_a_precompute_store_of_the_whole_model(tmp_path: Any) -> None:
    from actstore.precompute.api import precompute

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    store = precompute(model, [(x[i], i) for i in range(20)], tmp_path / "p", layers="1", progress=False)
    frozen = model[:2]  # the frozen part: precompute fingerprinted exactly these modules
    enc = RecycledEncoder(frozen, store)
    assert enc.names == ["1"]
    batch = torch.cat([x[:5], torch.randn(3, 4)])  # a tensor batch: rows keyed one by one
    out = enc(batch)
    assert (enc.hits, enc.misses) == (5, 3) and out.shape == (8, 8)
    with torch.no_grad():
        assert torch.allclose(out, frozen(batch), atol=1e-6)
        model[2].weight.add_(1.0)  # training the head: the store stays fresh
    RecycledEncoder(frozen, store, check_fingerprint=True)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a frozen weight: stale, by default
    with pytest.raises(StaleStoreError):
        RecycledEncoder(frozen, store)


def test_cached_dataset_follows_a_grown_dataset_after_a_second_precompute(tmp_path: Any) -> None:
    # attrs keep the first run's dataset length; the view written by the last run is what counts.
    model = torch.nn.Linear(4, 3)
    data = [torch.full((4,), float(i)) for i in range(10)]
    actstore.precompute(model, data[:6], tmp_path / "s", progress=False)
    actstore.precompute(model, data, tmp_path / "s", progress=False)
    ds = actstore.CachedDataset(data, tmp_path / "s")
    assert len(ds) == 10
    with torch.no_grad():
        # a batched forward and a one-row forward may round differently (BLAS kernels): float tolerance
        torch.testing.assert_close(ds[9], model(data[9]), rtol=1e-6, atol=1e-6)


def test_every_cheap_item_is_checked_at_construction(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 40)
    ds = CachedDataset(data, path)
    assert ds.checked == 40 and ds.check_mode == "all" and "checked=40 (all)" in repr(ds)
    edited = list(data)
    edited[17] = (data[17][0] + " (edited)", data[17][1])  # one item, wherever a spot check would miss it
    with pytest.raises(DatasetMismatchError, match=r"dataset\[17\]'s input has key .* changed since precompute"):
        CachedDataset(edited, path)
    spot = CachedDataset(edited, path, check=0)  # asked explicitly: no check (and the edit goes unnoticed)
    assert spot.checked == 0 and spot.check_mode == "spot"
    assert CachedDataset(data, path, check=5).checked == 5
    assert CachedDataset(data, path, index="keys").check_mode == "keys"
    with pytest.raises(ValueError, match="check: expected"):
        CachedDataset(data, path, check="some")


def test_items_that_change_type_are_named(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 12)
    changed = list(data)
    changed[6] = list(data[6])  # a list among tuples
    with pytest.raises(ValueError, match=r"dataset\[6\] is a list, but dataset\[0\] is a tuple"):
        CachedDataset(changed, path)


def test_expensive_items_get_spot_checks(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    big = [(torch.full((5000,), float(i)), i % 2) for i in range(20)]
    attrs = {"precompute": {"version": 2, "layers": [{"layer": "l", "field": "h", "ragged": False}],
                            "sample": {"type": "tuple", "length": 2, "input": 0,
                                       "side": [{"name": "1", "field": "label", "kind": "int"}], "dropped": []},
                            "dataset_length": 20, "keys": "inputs"}}  # a tensor as default_collate feeds it
    with actstore.create(path, {"h": Field((2,), "float32"), "label": Field((), "int64")}, attrs=attrs) as w:
        w.append([actstore.key(x) for x, _ in big], {"h": torch.zeros(20, 2), "label": torch.tensor([y for _, y in big])})
        w.set_view("dataset", np.arange(20))
        w.commit()
    ds = CachedDataset(big, path)
    assert ds.check_mode == "spot" and ds.checked == 8
    assert CachedDataset(big, path, check="all").checked == 20


# --- RecycledEncoder over split's frozen part, on raw inputs -----------------------------------------


def test_encoder_on_raw_texts_of_a_sentence_transformer(tmp_path: Any) -> None:
    pytest.importorskip("sentence_transformers")
    from actstore.models.split import split
    from actstore.testing.models import tiny_sentence_transformer

    model = tiny_sentence_transformer(tmp_path / "st")
    frozen, head = split(model, 0.5)
    texts = ["the cat sat", "a small green bird flew over the big tree", "dog", "the red log"]
    with torch.no_grad():
        want = model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
    enc = RecycledEncoder(frozen, str(tmp_path / "s"), append=True)  # texts go through the model's tokenizer
    with torch.no_grad():
        first = head(enc(texts[:2]))
        second = head(enc(list(reversed(texts))))  # two stored (other batch, other padding), two computed
    assert (enc.hits, enc.misses) == (2, 4) and enc.hit_rate == pytest.approx(1 / 3)
    torch.testing.assert_close(first, want[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, want.flip(0), rtol=1e-5, atol=1e-5)
    enc.close()
    again = RecycledEncoder(frozen, str(tmp_path / "s"))  # the frozen part's fingerprint matches
    with torch.no_grad():
        torch.testing.assert_close(head(again(texts)), want, rtol=1e-5, atol=1e-5)
    assert again.hit_rate == 1.0


def test_encoder_on_token_lists_of_a_decoder_with_a_collate(tmp_path: Any) -> None:
    from actstore.errors import LeftPaddingError
    from actstore.models.split import split
    from tests.family_models import tiny
    from tests.precompute_helpers import pad_collate, token_lists

    model = tiny("llama")
    model.train()  # dropout-free, so no warning: the mode does not matter for llama
    frozen, head = split(model, 0.5)
    seqs = token_lists(6)
    enc = RecycledEncoder(frozen, str(tmp_path / "d"), append=True, collate_fn=pad_collate)
    out = enc(seqs)
    assert isinstance(out, PaddedBatch) and out.lengths.tolist() == [len(q) for q in seqs]
    model.eval()
    with torch.no_grad():
        got = head(out).last_hidden_state
        want = model(**pad_collate(seqs)).last_hidden_state
    mask = out.mask
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    left = RecycledEncoder(frozen, str(tmp_path / "l"), append=True, collate_fn=lambda b: pad_collate(b, left=True))
    with pytest.raises(LeftPaddingError):
        left(seqs)
    with pytest.raises(TypeError, match="collate_fn="):
        RecycledEncoder(frozen, str(tmp_path / "t"), append=True)(["raw text"])


def test_encoder_on_images_and_train_mode_warning(tmp_path: Any) -> None:
    from actstore.models.split import split
    from tests.family_models import image_batch, tiny

    model = tiny("vit").train()
    frozen, head = split(model, 0.5)
    with pytest.warns(UserWarning, match="eval mode"):
        enc = RecycledEncoder(frozen, str(tmp_path / "v"), append=True)
    assert not frozen.training
    pixels = image_batch(3)
    out = enc(list(pixels))  # a list of image tensors, keyed one by one
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(out).pooler_output, model(pixel_values=pixels).pooler_output,
                                   rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 17, 32)
