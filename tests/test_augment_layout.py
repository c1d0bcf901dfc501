"""The tiled run order of stored augmentations (issue #25): the item-major view, the content-key cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actstore
from actstore.precompute import augment as augment_module
from actstore.precompute.augment import TILE, AugmentedItems, AugmentSpec, augment_generator, augmented_key
from actstore.precompute.inputs import input_keys
from actstore.precompute.loader import default_collate
from actstore.testing.models import tiny_mlp
from tests.precompute_helpers import vectors


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=g)


def _content(x: torch.Tensor) -> np.ndarray:
    return input_keys(default_collate([x]), 1)[0]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 2 * TILE + 52), k=st.integers(1, 5))
def test_run_order_covers_every_item_and_augmentation_once(n, k):
    # item_of and view_positions agree, and map the N*K run positions one to one onto p*K+v
    items = AugmentedItems(range(n), k)
    j = np.arange(len(items), dtype=np.int64)
    pos = items.view_positions(j)
    assert np.array_equal(np.sort(pos), j)
    for q in ({0, len(items) - 1, len(items) // 2, min(TILE * k, len(items) - 1)} if n else set()):
        v, p = items.item_of(q)
        assert 0 <= v < k and 0 <= p < n and pos[q] == p * k + v


def test_a_run_position_outside_the_run_is_refused():
    # (the tile formula alone maps position N*K of a one-tile run to item 0, augmentation K: an item the run lacks)
    items = AugmentedItems([torch.zeros(3)] * 10, 2)
    assert items.item_of(19) == (1, 9)
    for j in (20, 21, -1, TILE * 2):
        with pytest.raises(IndexError, match="out of range"):
            items[j]


def test_content_key_cache_keeps_the_batch_keys_when_it_is_cleared():
    # The cache is bounded: a batch that both reuses cached items and brings enough new ones to clear it must still
    # key its cached items (a batch straddling two tiles, or a worker's batch that other workers' batches cut).
    xs = [torch.full((3,), float(i)) for i in range(4 * TILE + 200)]
    spec = AugmentSpec(noise, 2)
    first = list(range(4 * TILE))
    spec.apply([xs[p] for p in first], first, [0] * len(first), default_collate, None)
    batch = list(range(4 * TILE - 100, 4 * TILE + 200))  # 100 cached, 200 new
    content, out = spec.apply([xs[p] for p in batch], batch, [1] * len(batch), default_collate, None)
    want = np.stack([_content(xs[p]) for p in batch])
    np.testing.assert_array_equal(content, want)


def test_a_batch_error_names_the_items_and_augmentations_it_spans():
    items = AugmentedItems(range(TILE + 300), 2)
    # tile 0's augmentation 1 (items 1000..1023), then tile 1's augmentation 0 and 1 (items 1024..1323)
    j0, j1 = 2 * TILE - 24, len(items)
    assert items.item_of(j0) == (1, TILE - 24) and items.item_of(j1 - 1) == (1, TILE + 299)
    msg = items.describe(j0, j1)
    assert "to dataset[1323] (augmentation 1)" in msg and "dataset[1000:1324]" not in msg
    assert items.describe(TILE, TILE + 24) == "dataset[0:24] (augmentation 1, one batch)"


def test_a_batch_straddling_tiles_after_the_cache_fills(tmp_path):
    # 5 tiles, batches that do not divide a tile's K passes: every position still gets its documented row.
    n, k = 4 * TILE + 300, 2
    data = vectors(n)
    store = actstore.precompute(tiny_mlp(), data, tmp_path / "s", layers="2", progress=False, batch_size=1000,
                                augment=noise, augmentations=k)
    view = np.asarray(store.view("dataset"))
    assert len(view) == n * k and np.array_equal(np.sort(view), np.arange(n * k))
    for p in (0, 1023, 1024, 4095, 4096, n - 1):
        x = data[p][0]
        c = _content(x)
        for v in range(k):
            y = noise(x, augment_generator(c, v))
            assert store.key_at(np.array([view[p * k + v]]))[0].tobytes() == augmented_key(c, v, _content(y))


@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([1, 2, 7, TILE - 1, TILE, TILE + 1, 2 * TILE + 52]), k=st.integers(2, 5),
       batch=st.sampled_from([3, 64, 1000]), dup=st.booleans())
def test_the_view_serves_each_item_its_documented_augmentations(tmp_path_factory, n, k, batch, dup):
    # Every (p, v) of the item-major view holds the row keyed augmented_key(content_key(p), v, key of the augmented
    # input), whatever N (partial last tile, smaller than one tile), K and the batch size; repeated items share rows.
    data = vectors(n)
    if dup and n > 2:
        data[n - 1] = data[0]
    path = tmp_path_factory.mktemp("s")
    store = actstore.precompute(tiny_mlp(), data, path, layers="2", progress=False, batch_size=batch,
                                augment=noise, augmentations=k)
    view = np.asarray(store.view("dataset"))
    assert len(view) == n * k
    stored = store.key_at(view)
    for p in range(n):
        x = data[p][0]
        c = _content(x)
        for v in range(k):
            want = augmented_key(c, v, _content(noise(x, augment_generator(c, v))))
            assert stored[p * k + v].tobytes() == want, (p, v)
    distinct = n - (1 if dup and n > 2 else 0)
    assert len(store) == distinct * k and np.array_equal(np.unique(view), np.arange(distinct * k))


def _centred(batch: list[torch.Tensor]) -> torch.Tensor:
    x = torch.stack(batch)
    return x - x.mean(0)  # every sample's input depends on its batch


def test_a_batch_dependent_collate_is_refused_naming_the_item_and_augmentation(tmp_path):
    # The pooled path collates new samples again and refuses those whose input changed: the message names the item and
    # its augmentation, not the run position (tile 1's run positions start at 1024 * K).
    data = [x for x, _ in vectors(1100)]
    data.append(data[1099])  # a repeat: its batches are not all new, their samples are pooled and collated again
    with pytest.raises(ValueError, match="collate_fn gives this sample other model inputs") as e:
        actstore.precompute(tiny_mlp(), data, tmp_path / "s", layers="2", progress=False, batch_size=100,
                            augment=noise, augmentations=3, collate_fn=_centred)
    assert str(e.value).startswith("dataset[1052] (augmentation 0): "), str(e.value)


def _expected_keys(data: list[torch.Tensor], k: int) -> np.ndarray:
    out = np.empty((len(data) * k, 32), np.uint8)
    for p, x in enumerate(data):
        c = _content(x)
        for v in range(k):
            out[p * k + v] = np.frombuffer(augmented_key(c, v, _content(noise(x, augment_generator(c, v)))), np.uint8)
    return out


def test_raising_k_and_resuming_a_store_of_another_run_order_find_every_row_by_key(tmp_path, monkeypatch):
    # A store written in the item-major run order of before the tiles (TILE = 1 gives it), resumed with tiles and
    # K raised from 2 to 4 (the tiles' order differs with K): the old rows are kept and found, only the new
    # augmentations are computed, and the view lists each (p, v) at p*K+v.
    data = [x for x, _ in vectors(TILE + 77)]
    path = tmp_path / "s"
    with monkeypatch.context() as m:
        m.setattr(augment_module, "TILE", 1)
        old = actstore.precompute(tiny_mlp(), data, path, layers="2", progress=False, batch_size=100,
                                  augment=noise, augmentations=2)
        old_view = np.array(old.view("dataset"))
        assert np.array_equal(old_view, np.arange(len(data) * 2))  # written item-major
        old.close()
    store = actstore.precompute(tiny_mlp(), data, path, layers="2", progress=False, batch_size=100,
                                augment=noise, augmentations=4, compact=False)
    view = np.asarray(store.view("dataset")).reshape(len(data), 4)
    assert len(store) == len(data) * 4
    np.testing.assert_array_equal(view[:, :2].ravel(), old_view)  # the old rows, where they were
    np.testing.assert_array_equal(store.key_at(view.ravel()), _expected_keys(data, 4))
    again = actstore.precompute(tiny_mlp(), data, path, layers="2", progress=False, batch_size=100,
                                augment=noise, augmentations=4, compact=False)
    np.testing.assert_array_equal(np.asarray(again.view("dataset")).reshape(len(data), 4), view)
