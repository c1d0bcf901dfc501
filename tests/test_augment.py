"""Stored augmentations: precompute(augment=, augmentations=K) and CachedDataset(augmentation=) (issue #25)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import actstore
from actstore.format.fields import Field
from actstore.format.record import PrecomputeRecord
from actstore.precompute.augment import augment_generator, augmented_key
from actstore.precompute.inputs import input_keys
from actstore.precompute.loader import default_collate
from actstore.testing.models import tiny_bert, tiny_mlp
from actstore.training.augmented import choose
from tests.precompute_helpers import pad_collate, token_lists, vectors

K = 3


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=g)


def other_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x - 0.5 * torch.randn(x.shape, generator=g)


def word_dropout(ids: list[int], g: torch.Generator) -> list[int]:
    """Drop each word (not [CLS]/[SEP]) with probability 0.3, keeping at least one."""
    words = ids[1:-1]
    keep = torch.rand(len(words), generator=g) >= 0.3
    kept = [w for w, k in zip(words, keep.tolist(), strict=True) if k] or words[:1]
    return [ids[0], *kept, ids[-1]]


def _mlp_store(tmp_path: Any, n: int = 12, k: int = K, fn: Any = noise, **kw: Any) -> tuple[Any, list[Any], Any]:
    model, data = tiny_mlp(), vectors(n)
    path = tmp_path / "s"
    store = actstore.precompute(model, data, path, layers="2", progress=False, batch_size=5, augment=fn,
                                augmentations=k, **kw)
    return model, data, store


def _content(x: Any, collate: Any = default_collate) -> bytes:
    return input_keys(collate([x]), 1)[0].tobytes()


# -- precompute ------------------------------------------------------------------------


def test_each_augmentation_is_recomputable_from_the_documented_seed_and_key(tmp_path):
    model, data, store = _mlp_store(tmp_path)
    view = store.view("dataset")
    assert len(view) == len(data) * K and len(store) == len(data) * K
    for p in (0, 5, 11):
        x = data[p][0]
        c = _content(x)
        for v in range(K):
            y = noise(x, augment_generator(c, v))
            want = model[:3](y[None])[0]
            row = int(view[p * K + v])
            torch.testing.assert_close(store[row]["2"], want, rtol=0, atol=1e-6)
            assert store.key_at(np.array([row]))[0].tobytes() == augmented_key(c, v, _content(y))
    rec = PrecomputeRecord.from_json(store.attrs["precompute"])
    assert (rec.version, rec.augmentations, rec.augment, rec.dataset_length) == (3, K, f"{__name__}.noise", len(data))


def test_rerun_reproduces_and_raising_k_computes_only_the_new_augmentations(tmp_path, capsys):
    model, data, store = _mlp_store(tmp_path)
    before = {int(r): store[int(r)]["2"].clone() for r in store.view("dataset")}
    keys = store.key_at(store.view("dataset")).copy()
    capsys.readouterr()
    again = actstore.precompute(model, data, tmp_path / "s", layers="2", progress=True, batch_size=5, augment=noise,
                                augmentations=K)
    assert "0 rows written" in capsys.readouterr().out
    np.testing.assert_array_equal(again.key_at(again.view("dataset")), keys)
    more = actstore.precompute(model, data, tmp_path / "s", layers="2", progress=True, batch_size=5, augment=noise,
                               augmentations=2 * K)
    assert f"{len(data) * K} rows written" in capsys.readouterr().out
    view = more.view("dataset").reshape(len(data), 2 * K)
    np.testing.assert_array_equal(more.key_at(view[:, :K].reshape(-1)), keys)  # augmentations 0..K-1 kept
    for r, old in before.items():
        assert torch.equal(more[int(more.lookup(store.key_at(np.array([r])))[0])]["2"], old)
    assert len({k.tobytes() for k in more.key_at(view.reshape(-1))}) == len(data) * 2 * K


def test_a_changed_augment_recomputes_its_rows_and_the_dataset_catches_it(tmp_path, capsys):
    model, data, store = _mlp_store(tmp_path)
    capsys.readouterr()
    actstore.precompute(model, data, tmp_path / "s", layers="2", progress=True, batch_size=5, augment=other_noise,
                        augmentations=K)
    assert f"{len(data) * K} rows written" in capsys.readouterr().out
    with pytest.raises(actstore.DatasetMismatchError, match=r"augmentation \d of dataset\[\d+\].*augment"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation="random", augment=noise)
    ds = actstore.CachedDataset(data, tmp_path / "s", augmentation="random", augment=other_noise)
    assert ds.checked == len(data)


def test_a_content_key_finds_the_unaugmented_row_never_an_augmented_one(tmp_path):
    model, data = tiny_mlp(), vectors(8)
    plain = actstore.precompute(model, data, tmp_path / "p", layers="2", progress=False)
    contents = np.stack([np.frombuffer(_content(x), np.uint8) for x, _ in data])
    plain_rows = plain.lookup(contents)
    assert (plain_rows >= 0).all()
    aug = actstore.precompute(model, data, tmp_path / "p", layers="2", progress=False, augment=noise,
                              augmentations=K, reclaim=False)
    rows = aug.lookup(contents)
    np.testing.assert_array_equal(rows, plain_rows)
    assert not np.isin(rows, aug.view("dataset")).any()
    only = actstore.precompute(model, data, tmp_path / "a", layers="2", progress=False, augment=noise,
                               augmentations=K)
    assert (only.lookup(contents) == -1).all()


def test_token_inputs_with_word_dropout(tmp_path):
    model, seqs = tiny_bert(), token_lists(10)
    store = actstore.precompute(model, seqs, tmp_path / "s", layers="encoder.layer.1", collate_fn=pad_collate,
                                progress=False, batch_size=4, augment=word_dropout, augmentations=4)
    view = store.view("dataset").reshape(10, 4)
    p = 3
    c = _content(seqs[p], pad_collate)
    y = word_dropout(seqs[p], augment_generator(c, 2))
    assert store[int(view[p, 2])]["encoder.layer.1"].shape[0] == len(y)
    ds = actstore.CachedDataset(seqs, store, collate_fn=pad_collate, augmentation=2, augment=word_dropout)
    assert torch.equal(ds[p], store[int(view[p, 2])]["encoder.layer.1"])


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "match"), [
    ({"augmentations": 0}, r"augmentations: expected an int >= 1.*got 0"),
    ({"augment": noise, "augmentations": 1}, r"augment= with augmentations=1"),
    ({"augmentations": 3}, r"augmentations=3: pass augment=fn"),
])
def test_bad_augmentation_counts(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        actstore.precompute(tiny_mlp(), vectors(4), tmp_path / "s", layers="2", progress=False, **kw)
    assert not (tmp_path / "s").exists()


def test_an_augment_that_changes_the_type_or_shape_class_is_refused_naming_the_sample(tmp_path):
    with pytest.raises(TypeError, match=r"dataset\[0\].*returned a 1-d torch.float64 tensor, but the input is a "
                                        r"1-d torch.float32 tensor"):
        _mlp_store(tmp_path, fn=lambda x, g: x.double())
    with pytest.raises(TypeError, match=r"returned a list"):
        _mlp_store(tmp_path, fn=lambda x, g: x.tolist())

    def late(x: torch.Tensor, g: torch.Generator) -> Any:
        return x[None] if float(x[0]) == float(vectors(12)[7][0][0]) else x

    with pytest.raises(TypeError, match=r"dataset\[7\] \(augmentation 0\).*augment\(dataset\[7\]'s input.*2-d"):
        _mlp_store(tmp_path / "late", fn=late)


def test_an_augment_not_deterministic_under_its_generator_is_refused(tmp_path):
    def global_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x + torch.randn(x.shape)  # ignores g

    with pytest.raises(ValueError, match=r"two calls on dataset\[0\].*generator"):
        _mlp_store(tmp_path, fn=global_noise)
    assert not (tmp_path / "s").exists()


def test_serving_augmentations_of_a_store_without_them_says_how_to_add_them(tmp_path):
    data = vectors(6)
    actstore.precompute(tiny_mlp(), data, tmp_path / "s", layers="2", progress=False)
    with pytest.raises(actstore.NoAugmentationsError, match=r"holds no augmentations.*augment=fn, augmentations=K"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation="random")
    assert len(actstore.CachedDataset(data, tmp_path / "s", augmentation=None)) == 6


def test_cached_dataset_arguments_over_an_augmented_store(tmp_path):
    _, data, _ = _mlp_store(tmp_path)
    with pytest.raises(actstore.NoAugmentationsError, match="augmentation='random'"):
        actstore.CachedDataset(data, tmp_path / "s")
    with pytest.raises(ValueError, match=r"index in 0\.\.2.*got 3"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation=3, augment=noise)
    with pytest.raises(ValueError, match=r"expected 'random', 'draw'"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation="shuffle", augment=noise)
    with pytest.raises(ValueError, match=r"pass the same function as augment=.*check=0"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation="random")
    assert actstore.CachedDataset(data, tmp_path / "s", augmentation="random", check=0).checked == 0
    with pytest.raises(ValueError, match="fallback= computes un-augmented activations"):
        actstore.CachedDataset(data, tmp_path / "s", augmentation="random", check=0, fallback=lambda xs: xs)


# -- serving: coverage and determinism -------------------------------------------------


def _served_rows(loader: DataLoader, n_fields: str = "2") -> list[np.ndarray]:
    return [b[0].numpy() if isinstance(b, (list, tuple)) else b for b in loader]


def test_k_epochs_serve_each_position_its_k_augmentations(tmp_path):
    _, data, store = _mlp_store(tmp_path, n=20, k=4)
    ds = actstore.CachedDataset(data, store, augmentation="random", augment=noise, augment_seed=7)
    table = store.view("dataset").reshape(20, 4)
    for cycle in range(2):
        seen = np.empty((20, 4), np.int64)
        for slot in range(4):
            ds.set_epoch(cycle * 4 + slot)
            seen[:, slot] = ds.__getitems__(list(range(20))).rows
        assert all(sorted(seen[p]) == sorted(table[p]) for p in range(20))
    # not one fixed order: blocks of positions get different permutations
    orders = {tuple(int(choose(7, e, np.array([b * 1024]), 4)[0]) for e in range(4)) for b in range(40)}
    assert len(orders) > 1
    for p in (0, 3):  # the batch path and the item path serve the same augmentation
        ds.set_epoch(5)
        torch.testing.assert_close(ds[p][0], store[int(table[p, choose(7, 5, np.array([p]), 4)[0]])]["2"])
    draws = actstore.CachedDataset(data, store, augmentation="draw", augment=noise)
    served = set()
    for e in range(4):
        draws.set_epoch(e)
        served.add(tuple(draws.__getitems__(list(range(20))).rows.tolist()))
    assert len(served) > 1


def test_an_epoch_reads_runs_of_consecutive_rows(tmp_path):
    # Precompute writes tiles of 1024 items augmentation-major (the rows of augmentation v of a tile's items are
    # consecutive) and the same blocks of positions share their choice: an epoch reads runs of consecutive rows.
    n = 2500
    model, data = tiny_mlp(), vectors(n)
    store = actstore.precompute(model, data, tmp_path / "s", layers="2", progress=False, batch_size=256, augment=noise,
                                augmentations=4)
    table = store.view("dataset").reshape(n, 4)
    for t in range(0, n, 1024):  # each tile: its rows, augmentation by augmentation
        size = min(1024, n - t)
        np.testing.assert_array_equal(table[t: t + size].T.ravel(), np.arange(4 * t, 4 * t + 4 * size))
    ds = actstore.CachedDataset(data, store, augmentation="random", check=0)
    for e in range(4):
        ds.set_epoch(e)
        rows = ds.__getitems__(list(range(n))).rows
        for b in range(0, n, 1024):
            assert (np.diff(rows[b: b + 1024]) == 1).all(), (e, b)
        assert (rows == table[np.arange(n), choose(0, e, np.arange(n), 4)]).all()


def test_the_same_batches_with_0_and_2_persistent_workers_and_two_instances(tmp_path):
    _, data, store = _mlp_store(tmp_path, n=16)
    runs = []
    for workers in (0, 2):
        ds = actstore.CachedDataset(data, store, augmentation="random", augment=noise, augment_seed=3)
        sampler = ds.epoch_sampler(torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
        loader = DataLoader(ds, batch_size=5, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        epochs = []
        for e in range(K + 1):
            sampler.set_epoch(e)
            epochs.append(np.concatenate([b[0].numpy() for b in loader]))
        runs.append(epochs)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], runs[0][1])


def test_ranks_serve_what_one_process_serves(tmp_path):
    _, data, store = _mlp_store(tmp_path, n=14)
    ds = actstore.CachedDataset(data, store, augmentation="random", augment=noise)
    whole: dict[int, int] = {}
    for p, r in zip(range(14), ds.__getitems__([(2, p) for p in range(14)]).rows, strict=True):
        whole[p] = int(r)
    got: dict[int, int] = {}
    for rank in range(2):
        mine = actstore.CachedDataset(data, store, augmentation="random", augment=noise)
        sampler = mine.epoch_sampler(DistributedSampler(mine, num_replicas=2, rank=rank, shuffle=True, seed=1))
        sampler.set_epoch(2)
        idx = list(sampler)
        batch = mine.__getitems__(idx)
        got.update({int(p): int(r) for p, r in zip(batch.positions, batch.rows, strict=True)})
    assert got == whole


def test_a_fixed_augmentation_and_side_values(tmp_path):
    _, data, store = _mlp_store(tmp_path, n=9)
    table = store.view("dataset").reshape(9, K)
    ds = actstore.CachedDataset(data, store, augmentation=1, augment=noise)
    x, label = next(iter(DataLoader(ds, batch_size=9)))
    torch.testing.assert_close(x, torch.stack([store[int(r)]["2"] for r in table[:, 1]]))
    assert label.tolist() == [lab for _, lab in data]


# -- actstore bench --augment ----------------------------------------------------------


def noise_factory() -> Any:
    return noise


def bench_vectors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, generator=gen) for _ in range(8)]


def test_bench_with_stored_augmentations_reports_the_break_even_against_on_the_fly(tmp_path, capsys):
    from actstore.cli import main as cli_main

    here = __file__
    base = ["bench", "--steps", "1", "--rounds", "1", "--batch-size", "4", "-q", "--model",
            "actstore.testing.models:tiny_mlp", "--data", f"{here}:bench_vectors", "--depths", "50"]
    code = cli_main([*base, "--augment", f"{here}:noise_factory", "--augmentations", "3", "--out",
                     str(tmp_path / "b"), "--no-plot"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "break-even vs full + on-the-fly augment" in out and "precompute s (3 augmentations)" in out
    assert "3 stored augmentations per item" in out
    import json

    report = json.loads((tmp_path / "b.json").read_text())
    assert report["augmentations"] == 3 and report["rows"][1]["breakeven_vs_full"] is not None
    code = cli_main([*base, "--augmentations", "3"])
    assert code == 2 and "--augment and --augmentations go together" in capsys.readouterr().err


# -- the documented formulas, computed here from docs/FORMAT.md §11 and docs/augmentations.md -----------------


def test_seed_key_and_choice_formulas_as_documented():
    import itertools
    import math

    from blake3 import blake3

    from actstore.precompute.augment import augment_seed

    c, a, v = bytes(range(32)), bytes(range(32, 64)), 3
    seed = int.from_bytes(blake3(b"actstore-augment-seed-v1\x00" + c + v.to_bytes(4, "little")).digest()[:8],
                          "little") & (2**63 - 1)
    assert augment_seed(c, v) == seed
    assert torch.equal(torch.rand(4, generator=augment_generator(c, v)),
                       torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    assert augmented_key(c, v, a) == blake3(b"actstore-augmented-key-v1\x00" + c + v.to_bytes(4, "little") + a).digest()

    def h(s: int, e: int, p: int, i: int) -> int:  # SplitMix64's finaliser over s*A + e*B + p*C + i*D mod 2**64
        m = 2**64 - 1
        x = (s * 0x9E3779B97F4A7C15 + e * 0xBF58476D1CE4E5B9 + p * 0x94D049BB133111EB + i * 0xD6E8FEB86659FD93) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    for count in (3, 4, 9):
        perms = list(itertools.permutations(range(count)))
        for epoch in (0, count + 1, 2 * count + count - 1):
            cycle, slot = divmod(epoch, count)
            want = []
            positions = [0, 7, 1023, 1024, 5000, 70_000]
            for p in positions:  # blocks of 1024 consecutive positions share their choice
                r = h(5, cycle, p // 1024, 0) % math.factorial(count)
                want.append(perms[r][slot] if count <= 8 else _lexicographic(count, r)[slot])
            assert choose(5, epoch, np.array(positions), count).tolist() == want
        positions = [0, 3, 2048, 99_999]
        assert choose(5, 7, np.array(positions), count, "draw").tolist() == \
            [h(5, 7, p // 1024, count) % count for p in positions]


def _lexicographic(count: int, r: int) -> list[int]:
    import math

    rest, out = list(range(count)), []
    for i in range(count):
        f = math.factorial(count - 1 - i)
        out.append(rest.pop(r // f))
        r %= f
    return out


def test_stored_side_values_are_listed_per_item_augmentation(tmp_path):
    # The run goes augmentation-major; the view's columns (fixed and ragged) are recorded item-major, p * K + v.
    model, xs = tiny_mlp(), vectors(7)
    data = [(x, i, torch.arange(i % 3 + 1)) for i, (x, _) in enumerate(xs)]
    store = actstore.precompute(model, data, tmp_path / "s", layers="2", progress=False, batch_size=3, augment=noise,
                                augmentations=K, side_fields={"2": Field((None,), "int64")})
    cols = store.view_columns("dataset")
    np.testing.assert_array_equal(cols.reader.fixed("item_1"), np.repeat(np.arange(7), K))
    values, offsets = cols.reader.ragged("item_2")
    for q in range(7 * K):
        np.testing.assert_array_equal(values[offsets[q]: offsets[q + 1]], np.arange(q // K % 3 + 1))
    keys = cols.item_key
    table = store.view("dataset")
    assert np.array_equal(keys, store.key_at(table))  # each position's key: its row's


def test_each_item_is_collated_once_for_its_content_key(tmp_path):
    # A tile's K passes reuse its items' content keys: an item is collated once for its key, once per augmentation.
    seen = []

    def collate(batch: list[Any]) -> Any:
        seen.append(len(batch))
        return default_collate(batch)

    n = 40
    actstore.precompute(tiny_mlp(), vectors(n), tmp_path / "s", layers="2", progress=False, batch_size=8,
                        augment=noise, augmentations=K, collate_fn=collate)
    check = 2 + 2  # check_augment: the item and its two augmentations, collated one by one (content key, a, b)
    assert sum(seen) <= n + n * K + check + 1, seen
