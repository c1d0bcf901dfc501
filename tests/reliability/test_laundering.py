"""Damage is never laundered, and nothing is lost through forked processes.

* **Corruption before compaction**: every kind of file × every damage of the
  corruption suite, then ``compact()``: compaction refuses the damaged store
  (nothing published, the damaged files kept) or leaves the damage where it
  was, and ``verify()`` still names it afterwards.  The automatic merge after a
  commit never fails the commit.
* **Cached-file corruption** of a remote store: each kind of file in the chunk
  cache damaged in every way; a fresh handle over that cache returns exactly
  the committed values and ``verify()`` passes (the damaged copy is checked and
  fetched again).
* **Forked and spawned writers**: children forked from a writer are refused
  (and lose none of the parent's rows), a spawned process cannot take the
  lock, and ``RecycledEncoder(append=True)`` in fork and spawn DataLoader
  workers stores every miss exactly once.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
import actstore.store
from actstore import TieredMerge
from actstore.testing.s3_server import SeaweedS3

from . import harness as h
from .test_corruption import COMMITS, DAMAGES, KINDS, N, build, damage, roles

#: Kinds a compaction could launder: every file of a segment, and the index and view files beside them.
COMPACT_KINDS = [k for k in KINDS if k not in ("root manifest", "lock")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("launder-templates")
    build(d / "good", 0)
    build(d / "other", 1000)
    return {"good": d / "good", "other": d / "other", "good_roles": roles(d / "good"),
            "other_roles": roles(d / "other")}


def compact_case(stores: dict[str, Any], case_dir: Path, kind: str, how: str, seed: int) -> str:
    store = case_dir / "s"
    shutil.copytree(stores["good"], store)
    role = KINDS[kind]
    target = store / stores["good_roles"][role]
    other = stores["other"] / stores["other_roles"][role] if role in stores["other_roles"] else None
    what = damage(target, how, random.Random(seed), other)
    if what is None:
        return "not applicable"
    h.count("compactions_of_damaged_stores")
    where = f"{kind} ({role}) {what}"
    try:
        with actstore.open(store, mode="a") as w:
            gen, segments = w.generation, [s.id for s in w.manifest.segments]
            try:
                w.compact()
                outcome = "compacted"
            except (actstore.StoreError, OSError):
                assert w.generation == gen and [s.id for s in w.manifest.segments] == segments, where
                outcome = "refused"
    except (actstore.StoreError, OSError):
        outcome = "open refused"  # (a damaged index run or view: open maps them)
    if outcome == "compacted":
        assert kind not in SEGMENT_KINDS, f"{where}: compaction merged a damaged segment"
    with pytest.raises(actstore.CorruptStoreError) as info, actstore.open(store) as s:
        s.verify()  # the damage is still reported
    rel = os.path.relpath(target, store)
    names = {rel, os.path.dirname(rel) + "/zarr.json", "/".join(rel.split("/")[:2]) + "/zarr.json"}
    assert any(n in str(info.value) for n in names), f"{where}: verify no longer names the damage: {info.value}"
    h.count("compactions_refused" if outcome != "compacted" else "compactions_left_the_damage")
    h.count("damage_reported_after_compaction")
    return outcome


SEGMENT_KINDS = {k for k, role in KINDS.items() if role.startswith("segments/")}
CASES = [(k, d) for k in COMPACT_KINDS for d in DAMAGES]


@pytest.mark.parametrize("kind,how", CASES, ids=[f"{k.replace(' ', '_')}-{d}" for k, d in CASES])
def test_corruption_before_compaction(stores: dict[str, Any], tmp_path: Path, kind: str, how: str) -> None:
    compact_case(stores, tmp_path, kind, how, seed=zlib.crc32(f"compact/{kind}/{how}".encode()))


@pytest.mark.slow
def test_corruption_before_compaction_many(stores: dict[str, Any], tmp_path: Path) -> None:
    """Every kind, every damage, 4 random instances each."""
    for kind, how in CASES:
        for seed in range(4):
            d = tmp_path / f"{kind.replace(' ', '_')}-{how}-{seed}"
            compact_case(stores, d, kind, how, seed + 500)
            shutil.rmtree(d)


@pytest.mark.parametrize("kind", ["fixed field data", "keys", "ragged offsets", "quantised scales"])
def test_the_automatic_merge_never_fails_the_commit_over_damage(stores: dict[str, Any], tmp_path: Path,
                                                                kind: str) -> None:
    store = tmp_path / "s"
    shutil.copytree(stores["good"], store)
    damage(store / stores["good_roles"][KINDS[kind]], "bitflip", random.Random(7), None)
    w = actstore.open(store, mode="a")
    w.merge_policy = TieredMerge(fanout=4, min_rows=1000)  # one tier: the three segments and this commit's merge
    h.append_range(w, N, N + 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.commit()
    assert any("automatic merge" in str(c.message) for c in caught), [str(c.message) for c in caught]
    assert len(w) == N + 5 and len(w.manifest.segments) == len(COMMITS) + 1
    w.close()
    with pytest.raises(actstore.CorruptStoreError), actstore.open(store) as s:
        s.verify()
    h.count("automatic_merges_over_damage")


# --- the chunk cache of a remote store ---------------------------------------------------------

CACHE_KINDS = {k: KINDS[k] for k in ("fixed field data", "scalar field data", "keys", "ragged values",
                                     "ragged offsets", "quantised codes", "quantised scales", "view rows")}
CACHE_KINDS |= {"index prefixes": "indexes/#0/prefix/c/0", "index rows": "indexes/#0/row/c/0"}  # (push: one run)
CACHE_DAMAGES = ["bitflip", "truncate", "zero_page", "append", "delete", "swap"]


@pytest.fixture(scope="module")
def remote(s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("launder-remote")
    url = f"s3://{s3_server.make_bucket()}/store"
    opts = s3_server.storage_options
    build(d / "local", 0)
    actstore.store.push(d / "local", url, cache_dir=d / "push-cache", storage_options=opts)
    warm = d / "warm-cache"
    with actstore.open(url, cache_dir=warm, storage_options=opts) as s:
        h.assert_rows(s, N)  # every file in the cache, checked
        m = s.manifest
    ids = {x.id: f"#{i}" for i, x in enumerate(m.segments)} | {r.id: f"#{i}" for i, r in enumerate(m.indexes)}
    ids |= {v.id: f"#{name}" for name, v in m.views.items()}
    cached = {}  # role -> path in the cache's mirror (the remote store's own object ids)
    for dirpath, _, files in os.walk(warm / "store"):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), warm / "store")
            cached["/".join(ids.get(p, p) for p in rel.split(os.sep))] = rel
    build(d / "other", 1000)
    return {"url": url, "opts": opts, "warm": warm, "roles": cached, "other": d / "other",
            "other_roles": roles(d / "other")}


def cache_case(remote: dict[str, Any], case_dir: Path, kind: str, how: str, seed: int) -> None:
    cache = case_dir / "cache"
    shutil.copytree(remote["warm"], cache)
    role = CACHE_KINDS[kind]
    target = cache / "store" / remote["roles"][role]
    other = remote["other"] / remote["other_roles"][KINDS[kind]]
    if damage(target, how, random.Random(seed), other) is None:
        return
    h.count("cache_corruptions")
    with actstore.open(remote["url"], cache_dir=cache, storage_options=remote["opts"]) as s:
        h.assert_rows(s, N)  # the committed values, never the damaged copy's
        s.verify()
    h.count("cache_corruptions_caught")


CACHE_CASES = [(k, d) for k in CACHE_KINDS for d in CACHE_DAMAGES]


@pytest.mark.parametrize("kind,how", CACHE_CASES, ids=[f"{k.replace(' ', '_')}-{d}" for k, d in CACHE_CASES])
def test_cached_file_corruption(remote: dict[str, Any], tmp_path: Path, kind: str, how: str) -> None:
    cache_case(remote, tmp_path, kind, how, seed=zlib.crc32(f"cache/{kind}/{how}".encode()))


@pytest.mark.slow
def test_cached_file_corruption_many(remote: dict[str, Any], tmp_path: Path) -> None:
    for kind, how in CACHE_CASES:
        for seed in range(3):
            d = tmp_path / f"{kind.replace(' ', '_')}-{how}-{seed}"
            cache_case(remote, d, kind, how, seed + 900)
            shutil.rmtree(d)


# --- forked and spawned writers ------------------------------------------------------------------


def _child_commits(path: str, out: str) -> None:
    """In a process forked from the writer: try to write through the inherited handle."""
    s = _INHERITED[path]
    try:
        h.append_range(s, 5000, 5001)
        s.commit()
        result = "committed"
    except actstore.StoreLockedError as e:
        result = "refused" if "forked" in str(e) else f"refused without saying why: {e}"
    except BaseException as e:  # noqa: BLE001 - reported
        result = f"{type(e).__name__}: {e}"
    Path(out).write_text(result)


_INHERITED: dict[str, actstore.ActivationStore] = {}


@pytest.mark.parametrize("rounds", [3])
def test_forked_writers_are_refused_and_lose_nothing(tmp_path: Path, rounds: int) -> None:
    path = str(tmp_path / "s")
    h.make_store(path)
    w = actstore.open(path, mode="a")
    _INHERITED[path] = w
    ctx = mp.get_context("fork")
    total = h.INITIAL_ROWS
    try:
        for r in range(rounds):
            procs = [ctx.Process(target=_child_commits, args=(path, str(tmp_path / f"{r}-{c}.txt"))) for c in range(4)]
            for p in procs:
                p.start()
            h.append_range(w, total, total + 3)  # the parent writes meanwhile
            w.commit()
            total += 3
            for p in procs:
                p.join(60)
                assert p.exitcode == 0
            for c in range(4):
                assert (tmp_path / f"{r}-{c}.txt").read_text() == "refused"
                h.count("forked_writes_refused")
    finally:
        del _INHERITED[path]
        w.close()
    assert h.check_store(path, {total}) == total


def _spawned_writer(path: str, out: str) -> None:
    try:
        actstore.open(path, mode="a")
        Path(out).write_text("opened")
    except actstore.StoreLockedError:
        Path(out).write_text("locked")


def test_a_spawned_process_cannot_take_the_writers_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    h.make_store(path)
    with actstore.open(path, mode="a") as w:
        p = mp.get_context("spawn").Process(target=_spawned_writer, args=(path, str(tmp_path / "out")))
        p.start()
        p.join(120)
        assert (tmp_path / "out").read_text() == "locked"
        h.append_range(w, h.INITIAL_ROWS, h.INITIAL_ROWS + 2)
    h.count("spawned_writes_refused")
    assert h.check_store(path, {h.INITIAL_ROWS + 2}) == h.INITIAL_ROWS + 2


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_recycled_encoder_in_workers_stores_every_miss_once(tmp_path: Path, method: str) -> None:
    from actstore.training.encoder import RecycledEncoder
    from tests.test_encoder_workers import DISTINCT, Encode, Frozen, Samples

    path = tmp_path / "enc"
    frozen = Frozen()
    enc = RecycledEncoder(frozen, str(path), append=True, commit_every_rows=3)
    loader = torch.utils.data.DataLoader(Samples(), batch_size=4, num_workers=2, collate_fn=Encode(enc), timeout=300,
                                         multiprocessing_context=mp.get_context(method))
    for x, out, _ in loader:
        with torch.no_grad():
            torch.testing.assert_close(out, frozen(x), rtol=0, atol=1e-5)  # (misses: computed in sub-batches)
    enc.close()
    with actstore.open(path) as s:
        s.verify()
        keys = s.key_at(np.arange(len(s)))
        assert len(s) == DISTINCT == len({bytes(k) for k in keys})
    h.count("encoder_worker_runs")
    h.count("encoder_misses_stored_once", DISTINCT)
