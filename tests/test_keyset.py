"""The writer's in-memory key set: exact membership whatever the keys look like."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from actstore.engine.write.keyset import KeySet

KEY = st.binary(min_size=32, max_size=32)


def as_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32) if keys else np.empty((0, 32), np.uint8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(KEY, max_size=40), max_size=8), st.lists(KEY, max_size=40))
def test_matches_a_python_set(batches: list[list[bytes]], queries: list[bytes]) -> None:
    ks, ref = KeySet(), set()
    for batch in batches:
        new = [k for k in dict.fromkeys(batch) if k not in ref]  # add takes distinct, absent keys
        ks.add(as_array(new))
        ref.update(new)
        probe = batch + queries
        assert ks.contains(as_array(probe)).tolist() == [k in ref for k in probe]
    assert len(ks) == len(ref)


def test_keys_that_share_prefixes_or_words() -> None:
    """Keys alike in their first 8 bytes, or whose words xor to the same hash, stay distinct."""
    base = np.zeros((5000, 32), np.uint8)
    base[:, -4:] = np.arange(5000, dtype=">u4").view(np.uint8).reshape(-1, 4)  # same prefix for all
    swapped = base.copy()
    swapped[:, 8:16], swapped[:, 24:32] = base[:, 24:32], base[:, 8:16]  # same xor of the words
    ks = KeySet()
    for i in range(0, 5000, 700):
        assert not ks.contains(base[i : i + 700]).any()
        ks.add(base[i : i + 700])
    assert ks.contains(base).all()
    assert not ks.contains(swapped[1:]).any()  # row 0 of swapped is row 0 of base
    assert ks.contains(swapped[:1]).all()


def test_many_random_keys_grow_the_bitmap() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (300_000, 32), dtype=np.uint8)
    ks = KeySet()
    for i in range(0, len(keys), 4096):
        assert not ks.contains(keys[i : i + 4096]).any()
        ks.add(keys[i : i + 4096])
    assert ks.contains(keys[::97]).all()
    other = rng.integers(0, 256, (20_000, 32), dtype=np.uint8)
    assert not ks.contains(other).any()


def test_added_keys_are_copied() -> None:
    """The caller may refill its key buffer right after add (the writer passes the user's array through)."""
    rng = np.random.default_rng(1)
    buf = rng.integers(0, 256, (64, 32), dtype=np.uint8)
    orig = buf.copy()
    ks = KeySet()
    ks.add(buf)
    buf[:] = rng.integers(0, 256, (64, 32), dtype=np.uint8)
    ks.add(rng.integers(0, 256, (300_000, 32), dtype=np.uint8))  # grows the bitmap: rebuilt from the stored keys
    assert ks.contains(orig).all()
    assert not ks.contains(buf).any()


def test_keys_sharing_four_bytes() -> None:
    """Several added keys with the same first 4 bytes: every one is found, others are not."""
    keys = np.zeros((50, 32), np.uint8)
    keys[:, 4:8] = np.arange(50, dtype=">u4").view(np.uint8).reshape(-1, 4)
    ks = KeySet()
    ks.add(keys[:25])
    ks.add(keys[25:40])
    assert ks.contains(keys).tolist() == [True] * 40 + [False] * 10


def test_find_returns_insertion_numbers() -> None:
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    ks = KeySet()
    for i in range(0, 5000, 1000):
        ks.add(keys[i : i + 1000])
    order = rng.permutation(5000)
    assert ks.find(keys[order]).tolist() == order.tolist()
    assert ks.find(rng.integers(0, 256, (10, 32), dtype=np.uint8)).tolist() == [-1] * 10


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(KEY, max_size=60), max_size=8), st.lists(KEY, max_size=60), st.integers(0, 3))
def test_keys_whose_hashes_collide_are_told_apart_by_their_bytes(batches: list[list[bytes]],
                                                                   queries: list[bytes], spread: int) -> None:
    """With a hash of a few values, every query meets runs of several keys with its hash; the answer
    (insertion numbers) is still a Python dict's."""
    ks, ref = KeySet(), {}
    few = np.uint64(spread + 1)
    ks._hash = lambda keys: (np.ascontiguousarray(keys).view(np.uint64)[:, 1] % few) << np.uint64(60)  # type: ignore[method-assign]
    for batch in batches:
        new = [k for k in dict.fromkeys(batch) if k not in ref]
        ks.add(as_array(new))
        ref.update({k: n for n, k in enumerate(new, start=len(ref))})
        probe = batch + queries
        assert ks.find(as_array(probe)).tolist() == [ref.get(k, -1) for k in probe]
