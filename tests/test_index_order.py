"""A commit's key-index run: sorted by prefix, equal prefixes in row order (FORMAT.md §6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import actstore
from actstore import Field
from actstore.engine.read.snapshot import key_prefixes
from actstore.engine.write.index_order import stable_order


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=300), st.sampled_from([0, 1, 2, 3, 7, 8, 2**9, 2**20, 2**58]))
def test_stable_order_is_numpys_stable_sort(values: list[int], spread: int) -> None:
    prefixes = np.array(values, np.uint64)
    if spread and len(prefixes):  # fold onto a few values: many equal prefixes, the case the fast sort cannot keep
        prefixes = prefixes % np.uint64(spread)
    order, ordered = stable_order(prefixes)
    want = np.argsort(prefixes, kind="stable")
    assert np.array_equal(order, want)
    assert np.array_equal(ordered, prefixes[want])


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 5000), st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 2**16)), max_size=40),
       st.integers(0, 2**32))
def test_stable_order_of_prefixes_differing_only_in_their_low_bits(n: int, near: list[tuple[int, int]],
                                                                  seed: int) -> None:
    # Random prefixes, a few of them copied with only low bits changed (or none: equal), so that some share
    # the high bits the fast sort orders by and are put in order again; the rest are sorted once.
    prefixes = np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64)
    for src, delta in near:
        prefixes[(src * 7919) % n] = prefixes[src % n] ^ np.uint64(delta)
    order, ordered = stable_order(prefixes)
    want = np.argsort(prefixes, kind="stable")
    assert np.array_equal(order, want)
    assert np.array_equal(ordered, prefixes[want])


def test_a_commit_of_keys_sharing_prefixes_indexes_them_in_row_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (5000, 32), dtype=np.uint8)
    keys[:, :8] = rng.integers(0, 7, (5000, 1), dtype=np.uint8)  # 7 distinct prefixes shared by 5,000 keys
    with actstore.create(tmp_path / "s", {"h": Field((4,), "float32")}) as s:
        s.append(keys, {"h": rng.standard_normal((5000, 4), dtype=np.float32)})
        s.commit()
        run = s.snapshot.runs[0]
        assert bool((np.diff(run.prefix.astype(np.float64)) >= 0).all())
        for p in np.unique(run.prefix):
            assert bool((np.diff(run.row[run.prefix == p]) > 0).all())
        assert np.array_equal(s.lookup(keys), np.arange(5000))


def test_a_key_prefix_is_its_first_8_bytes_read_big_endian_whatever_the_layout() -> None:
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (50, 40), dtype=np.uint8)
    for keys in (wide[:, :32], np.ascontiguousarray(wide[:, 8:]), wide[::-2, 4:36], wide[:0, :32]):
        want = [int.from_bytes(bytes(k[:8]), "big") for k in keys]
        got = key_prefixes(keys)
        assert got.dtype == np.uint64 and got.tolist() == want
