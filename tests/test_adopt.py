"""ActivationStore.adopt: adding other stores' committed segments in one commit (distributed precompute's merge)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import Field
from actstore.errors import StoreError

FIELDS = {"h": Field((3,), "float32"), "t": Field((None, 2), "bfloat16")}


def rows(ids: range | list[int]) -> tuple[list[bytes], dict[str, Any]]:
    ids = list(ids)
    return [actstore.key(i) for i in ids], {
        "h": np.array([[i, i + 0.5, -i] for i in ids], np.float32),
        "t": [torch.full((i % 4, 2), float(i), dtype=torch.bfloat16) for i in ids],
    }


def store_of(path: Path, *batches: range) -> actstore.ActivationStore:
    s = actstore.create(path, FIELDS, fingerprint="m")
    for b in batches:
        s.append(*rows(b))
        s.commit()
    return s


def content(store: actstore.ActivationStore) -> dict[bytes, tuple[list[float], list[float]]]:
    out = {}
    for r in range(len(store)):
        row = store[r]
        out[bytes(store.key_at([r])[0])] = (row["h"].tolist(), row["t"].float().flatten().tolist())
    return out


def test_adopt_links_disjoint_parts(tmp_path: Path) -> None:
    main = store_of(tmp_path / "main", range(0, 10))
    a = store_of(tmp_path / "a", range(10, 20), range(20, 25))
    b = store_of(tmp_path / "b", range(25, 40))
    a.close()
    b.close()
    gen = main.generation
    assert main.adopt([tmp_path / "a", tmp_path / "b"]) == 30
    assert main.generation == gen + 1 and len(main) == 40 and len(main.manifest.indexes) == 2  # one commit, one run
    assert main.lookup([actstore.key(i) for i in (0, 12, 39, 99)]).tolist() == [0, 12, 39, -1]
    main.verify()
    ref = store_of(tmp_path / "ref", range(0, 40))
    assert content(main) == content(ref)
    # hard links: the same inodes, so deleting the parts keeps the rows
    seg = main.manifest.segments[1].id
    f = os.path.join("segments", seg, "fields", "h", "c", "0", "0")
    assert os.stat(tmp_path / "main" / f).st_ino == os.stat(tmp_path / "a" / f).st_ino
    for p in ("a", "b"):
        for d, _, names in os.walk(tmp_path / p, topdown=False):
            for n in names:
                os.unlink(os.path.join(d, n))
            os.rmdir(d)
    main.close()
    reopened = actstore.open(tmp_path / "main")
    reopened.verify()
    assert content(reopened) == content(ref)


def test_adopt_copies_only_new_rows_of_overlapping_segments(tmp_path: Path) -> None:
    main = store_of(tmp_path / "main", range(0, 10))
    a = store_of(tmp_path / "a", range(5, 15))  # 5..9 already in main
    b = store_of(tmp_path / "b", range(12, 20))  # 12..14 also in a
    assert main.adopt([a, b]) == 10
    assert len(main) == 20
    main.verify()
    assert content(main) == content(store_of(tmp_path / "ref", range(0, 20)))
    assert main.adopt([a, b]) == 0  # idempotent: everything is there


def test_adopt_skips_segments_of_a_clone(tmp_path: Path) -> None:
    import shutil

    main = store_of(tmp_path / "main", range(0, 10))
    main.close()
    shutil.copytree(tmp_path / "main", tmp_path / "clone")
    clone = actstore.open(tmp_path / "clone", mode="a")
    clone.append(*rows(range(10, 13)))
    clone.commit()
    main = actstore.open(tmp_path / "main", mode="a")
    assert main.adopt(clone) == 3 and len(main.manifest.segments) == 2


def test_adopt_copy_mode_and_many_runs(tmp_path: Path) -> None:
    main = store_of(tmp_path / "main", range(0, 2))
    for i in range(12):  # more adoptions than MAX_INDEX_RUNS: the runs get merged
        part = store_of(tmp_path / f"p{i}", range(10 + 3 * i, 13 + 3 * i))
        assert main.adopt(part, copy=True) == 3
    seg = main.manifest.segments[-1].id
    f = os.path.join("segments", seg, "keys", "c", "0", "0")
    assert os.stat(tmp_path / "main" / f).st_ino != os.stat(tmp_path / "p11" / f).st_ino
    assert len(main.manifest.indexes) <= 8
    main.verify()
    assert main.lookup([actstore.key(45)]).tolist() == [2 + 3 * 11 + 2]


def test_adopt_refuses_mismatches(tmp_path: Path) -> None:
    main = store_of(tmp_path / "main", range(0, 3))
    other = actstore.create(tmp_path / "other", {"h": Field((3,), "float32")})
    with pytest.raises(ValueError, match="other fields"):
        main.adopt(other)
    stale = actstore.create(tmp_path / "stale", FIELDS, fingerprint="another")
    with pytest.raises(actstore.StaleStoreError):
        main.adopt(stale)
    main.append(*rows([50]))
    with pytest.raises(StoreError, match="pending"):
        main.adopt(store_of(tmp_path / "x", range(7, 9)))
    reader = actstore.open(tmp_path / "main")
    with pytest.raises(StoreError, match="read-only"):
        reader.adopt(tmp_path / "x")
