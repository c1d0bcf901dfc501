"""Hugging Face items as they come: dicts of forward arguments, padded to max_length, and datasets.Dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import CachedDataset
from actstore.testing.models import tiny_bert

LAYER = "encoder.layer.1"


def hf_items(n: int, max_length: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Tokeniser-style items: input_ids/attention_mask/token_type_ids padded to max_length, and labels."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(gen.integers(3, max_length + 1))
        ids = torch.zeros(max_length, dtype=torch.int64)
        ids[:length] = torch.as_tensor(gen.integers(5, 30, length))
        mask = (torch.arange(max_length) < length).long()
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(max_length, dtype=torch.int64),
                    "labels": i % 3})
    return out


def expected(model: Any, item: dict[str, Any]) -> torch.Tensor:
    """The layer's output on the unpadded sample alone."""
    n = int(item["attention_mask"].sum())
    with torch.no_grad():
        out = model(input_ids=item["input_ids"][None, :n], attention_mask=item["attention_mask"][None, :n],
                    token_type_ids=item["token_type_ids"][None, :n], output_hidden_states=True)
    return out.hidden_states[2][0]  # hidden_states[k + 1] is the output of encoder.layer.k


def test_dict_items_are_keyword_arguments_trimmed_by_their_mask(tmp_path: Any) -> None:
    model = tiny_bert(layers=3)
    data = hf_items(20)
    store = actstore.precompute(model, data, tmp_path / "s", layers=LAYER, batch_size=6, progress=False)
    assert store.fields[LAYER].ragged and store.view_columns("dataset").fields["labels"].shape == ()  # per position
    rec = store.attrs["precompute"]["sample"]
    assert rec["input"] == ["input_ids", "attention_mask", "token_type_ids"] and rec["side"][0]["name"] == "labels"
    view = store.view("dataset")
    for i, item in enumerate(data):
        row = store[int(view[i])]
        want = expected(model, item)
        assert row[LAYER].shape == want.shape  # trimmed to the real tokens
        torch.testing.assert_close(row[LAYER].float(), want, rtol=1e-4, atol=1e-5)
        assert int(store.view_columns("dataset")["labels"][i]) == item["labels"]  # side values: per position
    # CachedDataset gives back the items' structure, activations under the first input key
    ds = CachedDataset(data, store)
    assert set(ds[0]) == {"input_ids", "labels"} and torch.equal(ds[0]["input_ids"], store[int(view[0])][LAYER])
    batch = actstore.ActivationCollate(names={"input_ids": "hidden_states"})(ds.__getitems__([0, 1, 2]))
    assert list(batch) == ["hidden_states", "attention_mask", "labels"] and batch["labels"].tolist() == [0, 1, 2]


def test_the_same_text_padded_two_ways_is_one_row(tmp_path: Any) -> None:
    model = tiny_bert(layers=2)
    short = hf_items(4, max_length=12)
    pad = torch.zeros(8, dtype=torch.int64)
    long = [{k: torch.cat([v, pad]) if isinstance(v, torch.Tensor) else v for k, v in it.items()} for it in short]
    store = actstore.precompute(model, short + long, tmp_path / "s", layers="encoder.layer.0", progress=False)
    assert len(store) == 4
    view = store.view("dataset").tolist()
    assert view[:4] == view[4:]
    assert actstore.key({k: v[: int(short[0]["attention_mask"].sum())] for k, v in short[0].items() if k != "labels"}) \
        == bytes(store.key_at([view[0]])[0])


def test_an_all_zero_attention_mask_is_refused(tmp_path: Any) -> None:
    data = hf_items(5)
    data[3]["attention_mask"] = torch.zeros_like(data[3]["attention_mask"])
    with pytest.raises(ValueError, match=r"dataset\[3\]: attention_mask is all zeros"):
        actstore.precompute(tiny_bert(layers=2), data, tmp_path / "s", layers="encoder.layer.0", progress=False)


def test_a_datasets_dataset_in_torch_format(tmp_path: Any) -> None:
    datasets = pytest.importorskip("datasets")
    model = tiny_bert(layers=2)
    items = hf_items(10)
    ds = datasets.Dataset.from_dict({k: [it[k].tolist() if isinstance(it[k], torch.Tensor) else it[k] for it in items]
                                     for k in items[0]})
    ds.set_format("torch")
    store = actstore.precompute(model, ds, tmp_path / "s", layers="encoder.layer.1", batch_size=4, progress=False)
    view = store.view("dataset")
    for i, item in enumerate(items):
        torch.testing.assert_close(store[int(view[i])]["encoder.layer.1"].float(), expected(model, item),
                                   rtol=1e-4, atol=1e-5)
    cached = CachedDataset(ds, store)
    assert len(cached) == 10 and int(cached[4]["labels"]) == items[4]["labels"]


def test_bad_items_are_named(tmp_path: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    mixed = [(torch.ones(2) * i, i) for i in range(6)]
    mixed[4] = (torch.ones(2) * 4, 4.5)  # a float label among ints: would be cast silently
    with pytest.raises(ValueError, match=r"dataset\[4\]: side column '1' is a float .* the first item's is a int"):
        actstore.precompute(model, mixed, tmp_path / "a", layers="0", batch_size=2, progress=False)
    changing: list[Any] = [(torch.ones(2) * i, i) for i in range(3)] + [{"x": torch.ones(2), "y": 3}]
    with pytest.raises(TypeError, match=r"dataset\[3\]: the item is a dict, but the items before it are tuple"):
        actstore.precompute(model, changing, tmp_path / "b", layers="0", batch_size=2, progress=False)
    with pytest.raises(TypeError, match=r"dataset\[2\]: the item is a dict"):  # within one batch too
        actstore.precompute(model, changing[:2] + changing[3:], tmp_path / "c", layers="0", batch_size=8,
                            progress=False)


def test_a_zero_token_row_in_a_plain_dict_batch_is_named(tmp_path: Any) -> None:
    path = tmp_path / "s"
    with actstore.create(path, {"t": actstore.Field((None, 2), "float32")}) as w:
        w.append([actstore.key(i) for i in range(3)], {"t": [np.ones((2, 2)), np.ones((0, 2)), np.ones((1, 2))]})
        w.commit()
    ds = actstore.ActivationDataset(path)
    assert actstore.collate(ds.__getitems__([0, 1]))["t"].lengths.tolist() == [2, 0]  # PaddedBatch: allowed
    with pytest.raises(ValueError, match=r"dataset\[1\]: field 't' has a row of zero tokens"):
        actstore.ActivationCollate(names={})(ds.__getitems__([2, 1]))
