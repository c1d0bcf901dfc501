"""Batches that any loader and training stack can use: torch's default collate, plain dicts, rebuildable types."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import actstore
from actstore import ActivationCollate, ActivationDataset, CachedDataset, PaddedBatch
from tests import data_helpers as h


def _same(a: Any, b: Any) -> None:
    """Equal batch structures, types and values."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("collate")
    out: dict[str, Any] = {}
    for kind in ("dict", "tuple", "namedtuple"):
        out[kind] = (str(root / kind), h.make_store(root / kind, 60, kind=kind, commit_every=25))  # three segments
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_default_collate_gives_our_batch(stores: dict[str, Any], workers: int) -> None:
    path, _ = stores["dict"]
    ds = ActivationDataset(path)
    kw: dict[str, Any] = dict(batch_size=16, num_workers=workers)
    if workers:
        kw["multiprocessing_context"] = "fork"
    plain = list(DataLoader(ds, **kw))
    ours = list(DataLoader(ds, collate_fn=actstore.collate, **kw))
    assert len(plain) == 4
    for a, b in zip(plain, ours, strict=True):
        _same(a, b)
        assert isinstance(a["h"], PaddedBatch) and a["h"].mask.dtype == torch.bool  # ragged: padded with a mask
    rows = ds.store.gather(np.arange(16), "h")["h"]
    assert torch.equal(plain[0]["h"].values[plain[0]["h"].mask], rows.values)


@pytest.mark.parametrize("kind", ["dict", "tuple", "namedtuple"])
def test_default_collate_over_cached_dataset(stores: dict[str, Any], kind: str) -> None:
    path, data = stores[kind]
    ds = CachedDataset(data, path)
    plain = list(DataLoader(ds, batch_size=16, shuffle=False))
    ours = list(DataLoader(ds, batch_size=16, collate_fn=actstore.collate))
    for a, b in zip(plain, ours, strict=True):
        _same(a, b)
    assert type(plain[0]) is type(data[0]) or (kind == "tuple" and isinstance(plain[0], tuple))


def test_items_taken_out_of_a_batch_collate_as_plain_types(stores: dict[str, Any]) -> None:
    path, data = stores["tuple"]
    rb = ActivationDataset(path, fields=["label"]).__getitems__([3, 4])
    items = [rb[0], rb[1]]  # a list, not the RowBatch: collated as plain dicts would be, row by row
    assert all(isinstance(x, dict) for x in items)
    out = default_collate(items)
    assert type(out) is dict and type(out["label"]) is torch.Tensor and out["label"].tolist() == [3, 4]
    cb = CachedDataset(data, path).__getitems__([0, 1])
    pairs = [(cb[i][0].shape[0], cb[i][1]) for i in range(2)]  # tuples out of the batch, rebuilt by the user
    assert default_collate(pairs)[1].tolist() == [0, 1]
    t = default_collate([cb[0], cb[1]][0:1] * 1)  # one item from the batch: a plain tuple collate
    assert type(t) is list and t[1].tolist() == [0]


def test_padded_batch_survives_rebuilds() -> None:
    p = PaddedBatch(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.tensor([3, 3]))
    rebuilt = type(p)(x * 2 if x.is_floating_point() else x for x in p)  # transformers.Trainer._prepare_input
    assert isinstance(rebuilt, PaddedBatch) and float(rebuilt.values.sum()) == 48
    assert torch.equal(type(p)(*list(p)).lengths, p.lengths)  # accelerate / pin_memory: type(x)(*parts)
    values, mask, lengths = p
    assert values.shape == (2, 3, 4)
    with pytest.raises(TypeError, match="values, mask, lengths"):
        PaddedBatch(iter([torch.ones(1)]))


def test_plain_dict_batches(stores: dict[str, Any]) -> None:
    path, data = stores["dict"]
    ds = ActivationDataset(path)
    fmt = ActivationCollate(torch.float32, names={"h": "hidden_states"})
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=fmt)))
    ref = actstore.collate(ds.__getitems__(list(range(8))))
    assert type(batch) is dict and list(batch) == ["hidden_states", "attention_mask", "label", "score"]
    assert all(type(v) is torch.Tensor for v in batch.values())
    assert torch.equal(batch["hidden_states"], ref["h"].values.float()) and torch.equal(batch["attention_mask"], ref["h"].mask)
    # a CachedDataset of dict items: the input key's activations and the side columns, under their names
    cd = CachedDataset(data, path)
    out = ActivationCollate(names={"text": "hidden_states"}, mask_names={"text": "mask"})(cd.__getitems__([0, 1]))
    assert list(out) == ["hidden_states", "mask", "label", "score"] and out["label"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="two batch entries are named 'label'"):
        ActivationCollate(names={"h": "label"})(ds.__getitems__([0]))
    with pytest.raises(TypeError, match="names"):
        ActivationCollate(names={"h": 3})  # type: ignore[dict-item]
