"""Field names people can use: module aliases, name= per layer, KeyErrors that list the fields."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import actstore
from actstore.testing.models import tiny_sentence_transformer


def test_a_layer_is_stored_under_the_alias_written(tmp_path: Any) -> None:
    pytest.importorskip("sentence_transformers")
    model = tiny_sentence_transformer(tmp_path / "st")
    texts = ["the cat sat", "a dog", "the small green bird"]
    alias = "0.auto_model.encoder.layer.2"
    store = actstore.precompute(model, texts, tmp_path / "s", layers=alias, collate_fn=model.tokenize,
                                progress=False)
    assert alias in store.fields and store[0][alias].shape[-1] == store.fields[alias].shape[-1]
    rec = store.attrs["precompute"]["layers"][0]
    assert rec == {"layer": "0.model.encoder.layer.2", "field": alias, "ragged": True}  # module: the registered name
    ds = actstore.CachedDataset(texts, store, collate_fn=model.tokenize)
    assert torch.equal(ds[1], store[int(store.view("dataset")[1])][alias])


def test_name_per_layer_and_keyerrors(tmp_path: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = [torch.randn(3) for _ in range(5)]
    store = actstore.precompute(model, data, tmp_path / "s", layers={"0": "hidden", "2": "logits"}, progress=False)
    assert set(store.fields) == {"hidden", "logits"}
    with torch.no_grad():
        torch.testing.assert_close(store[2]["logits"], model(data[2]))  # (batched vs one row: rounding)
    assert torch.equal(store[0]["0"], store[0]["hidden"]) and list(store[0]) == ["hidden", "logits"]  # module name
    with pytest.raises(KeyError, match=r"no field '1' in this row; its fields are \['hidden', 'logits'\]"):
        store[0]["1"]
    with pytest.raises(KeyError, match=r"its fields are \['hidden', 'logits'\]"):
        actstore.ActivationDataset(store)[0]["nope"]
    with pytest.raises(ValueError, match="invalid name"):
        actstore.precompute(model, data, tmp_path / "t", layers={"0": "a/b"}, progress=False)
