"""ChunkShuffleSampler: coverage, determinism, locality and rank splitting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

from actstore.training.collate import collate
from actstore.training.datasets import ActivationDataset
from actstore.training.recycled import CachedDataset
from actstore.training.sampler import ChunkShuffleSampler
from tests import data_helpers as h

N = 1000


@pytest.fixture(scope="module")
def path(tmp_path_factory: Any) -> str:
    p = str(tmp_path_factory.mktemp("sampler") / "s")
    h.make_fixed_store(p, N, commit_every=300)  # segments of 300, 300, 300, 100 rows
    return p


def test_every_row_once_per_epoch(path: str) -> None:
    s = ChunkShuffleSampler(path, window=3, block_rows=25, seed=1)
    assert len(s) == N and s.blocks == 40  # 12 + 12 + 12 + 4 blocks: none crosses a segment
    for epoch in range(3):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(N))


def test_set_epoch_changes_the_order_deterministically(path: str) -> None:
    a = ChunkShuffleSampler(path, window=3, block_rows=25, seed=7)
    b = ChunkShuffleSampler(path, window=3, block_rows=25, seed=7)
    first = list(a)
    assert first == list(b) and first != list(range(N))
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    assert list(ChunkShuffleSampler(path, window=3, block_rows=25, seed=8)) != first


def test_reads_stay_within_a_window(path: str) -> None:
    window, block = 4, 25  # every block holds 25 rows here, so a window is exactly 100 indices
    span = window * block
    order = np.array(list(ChunkShuffleSampler(path, window=window, block_rows=block, seed=3)))
    blocks = order // block
    per_window = [np.unique(blocks[a : a + span]) for a in range(0, N, span)]
    assert all(len(w) == window for w in per_window)  # each stretch of 100 reads touches 4 blocks
    # consecutive indices come from the same window's blocks, except at the 9 window edges
    same = [blocks[i + 1] in per_window[i // span] for i in range(N - 1)]
    assert sum(same) >= N - 1 - (N // span - 1)
    # blocks are visited in a new order (not just shuffled in place)
    assert [int(w.min()) for w in per_window] != sorted(int(w.min()) for w in per_window)
    # a full shuffle has no such locality
    full = np.array(list(ChunkShuffleSampler(path, window=10_000, block_rows=block, seed=3, mix_segments=True))) // block
    assert np.mean([len(np.unique(full[a : a + span])) for a in range(0, N, span)]) > 30


def test_rank_splitting_is_disjoint_complete_and_equal(path: str) -> None:
    world = 3  # 1000 = 3 * 333 + 1: two rows are repeated to even the shards
    shards = [list(ChunkShuffleSampler(path, window=2, block_rows=25, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert [len(s) for s in shards] == [334] * 3
    assert len(ChunkShuffleSampler(path, rank=1, world_size=world)) == 334
    flat = np.concatenate(shards)
    assert set(flat.tolist()) == set(range(N))
    _, counts = np.unique(flat, return_counts=True)
    assert counts.max() == 2 and (counts == 2).sum() == 2  # the padding repeats
    dropped = [list(ChunkShuffleSampler(path, window=2, block_rows=25, seed=5, rank=r, world_size=world, drop_last=True))
               for r in range(world)]
    assert [len(s) for s in dropped] == [333] * 3
    assert len(set(np.concatenate(dropped).tolist())) == 999


def test_block_size_from_bytes(path: str) -> None:
    s = ChunkShuffleSampler(path, block_bytes=72 * 25)  # a row is 16 float32 + one int64 = 72 bytes
    assert s.block_rows == 25


def test_with_an_activation_dataset_in_a_dataloader(path: str) -> None:
    ds = ActivationDataset(path)
    sampler = ChunkShuffleSampler(ds, window=2, block_rows=50, seed=0)
    ys = np.concatenate([b["y"].numpy() for b in DataLoader(ds, batch_size=64, sampler=sampler, collate_fn=collate)])
    assert sorted(ys.tolist()) == list(range(N)) and ys.tolist() == list(sampler)


def test_cached_dataset_positions_follow_their_rows(tmp_path: Any) -> None:
    p = str(tmp_path / "c")
    data = h.make_store(p, 200, commit_every=50)
    data = data  # positions 0..199 map to rows 0..199; reverse the mapping with index='keys'
    rev = data[::-1]
    ds = CachedDataset(rev, p, index="keys")
    s = ChunkShuffleSampler(ds, window=1, block_rows=20, seed=0)
    order = np.array(list(s))
    assert sorted(order.tolist()) == list(range(200))
    rows = ds.rows[order]
    assert (np.abs(np.diff(rows)) < 20).mean() > 0.9  # local in row space, not position space


def test_bad_arguments(path: str) -> None:
    with pytest.raises(ValueError, match="window"):
        ChunkShuffleSampler(path, window=0)
    with pytest.raises(ValueError, match="rank"):
        ChunkShuffleSampler(path, rank=3, world_size=3)
    with pytest.raises(TypeError, match="store"):
        ChunkShuffleSampler(42)


def test_windows_stay_in_one_segment_unless_mixed(path: str) -> None:
    starts = np.array([0, 300, 600, 900, 1000])
    seg_of = lambda rows: np.searchsorted(starts, rows, side="right") - 1  # noqa: E731
    order = np.array(list(ChunkShuffleSampler(path, window=4, block_rows=25, seed=2)))
    # every 100 consecutive indices (one window here) lie in one segment
    assert all(len(np.unique(seg_of(order[a : a + 100]))) == 1 for a in range(0, N, 100))
    mixed = np.array(list(ChunkShuffleSampler(path, window=4, block_rows=25, seed=2, mix_segments=True)))
    assert sorted(mixed.tolist()) == list(range(N))
    assert max(len(np.unique(seg_of(mixed[a : a + 100]))) for a in range(0, N, 100)) > 1


def test_readahead_hints_cover_the_next_window(path: str, monkeypatch: Any) -> None:
    import os

    import actstore

    snap = actstore.open(path)._snap
    seg_of_dir = {seg.path: i for i, seg in enumerate(snap.segments)}
    row_bytes = {"x": 16 * 4, "y": 8}
    names: dict[int, str] = {}
    advised: set[tuple[str, int]] = set()  # (field, global row)
    real_open = os.open

    def fake_open(p: str, flags: int, *a: Any) -> int:
        fd = real_open(p, flags, *a)
        names[fd] = p
        return fd

    def fadvise(fd: int, off: int, n: int, advice: int) -> None:
        seg_dir, rest = names[fd].split(os.sep + "fields" + os.sep)
        field = rest.split(os.sep)[0]
        start = int(snap.starts[seg_of_dir[seg_dir]])
        assert advice == os.POSIX_FADV_WILLNEED and off % row_bytes[field] == 0
        advised.update((field, start + r) for r in range(off // row_bytes[field], (off + n) // row_bytes[field]))

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "posix_fadvise", fadvise, raising=False)
    it = iter(ChunkShuffleSampler(path, window=4, block_rows=25, seed=4))
    first = [next(it) for _ in range(100)]  # the first window: hinted up front, with the second
    assert {("x", r) for r in first} <= advised and {("y", r) for r in first} <= advised
    seen_before_second = set(advised)
    second = [next(it) for _ in range(100)]  # hinted while the first window was served
    assert {("x", r) for r in second} <= seen_before_second
    rest = list(it)
    assert sorted([*first, *second, *rest]) == list(range(N))
    plain = ChunkShuffleSampler(path, window=4, block_rows=25, seed=4, readahead=False)
    assert list(plain) == [*first, *second, *rest]  # hints never change the order
