"""Corruption testing: damage every kind of file a store holds, in every way.

For each file kind (shard data of a fixed field, keys, ragged values and
offsets, index prefixes and rows, a view and its columns, array / group / segment / index / view
metadata, the root manifest, the lock) and each damage (flip one random bit,
truncate, zero a page, append garbage, delete, replace with the same-named file
of another store):

* ``verify()`` raises :class:`CorruptStoreError` naming the damaged file (for
  the root manifest, ``open`` itself refuses the store; the lock file is
  harmless);
* a child process opens the store and reads every row, key and view, once
  plainly and once with ``verify_reads=True``: it never dies of a signal, and
  with ``verify_reads=True`` every read either raises a ``StoreError`` or
  returns exactly the right values.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore

from . import harness as h

COMMITS = [(0, 70), (70, 130), (130, 180)]  # three segments, three index runs
N = COMMITS[-1][1]
OTHER = 1000  # the other store holds rows OTHER.. with the same commit sizes


def build(path: Path, offset: int) -> None:
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES) as s:
        for lo, hi in COMMITS:
            k, v = h.batch(lo + offset, hi + offset)
            v["lab"] = np.arange(lo, hi)
            s.append(k, v)
            s.commit()
        # a view with columns per position (format 3): a side column and the positions' input keys
        s.set_view("order", np.arange(N), {"side": np.arange(N) % 7}, item_key=s.key_at(np.arange(N)))
        s.commit()


def roles(path: Path) -> dict[str, str]:
    """Role (the path with object ids replaced by their position in the manifest) -> real path."""
    m = actstore.open(path).manifest
    ids = {s.id: f"#{i}" for i, s in enumerate(m.segments)}
    ids |= {r.id: f"#{i}" for i, r in enumerate(m.indexes)}
    ids |= {v.id: f"#{name}" for name, v in m.views.items()}
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            role = "/".join(ids.get(p, p) for p in rel.split(os.sep))
            out[role] = rel
    return out


#: The file kinds under test (a subset of all roles: one of each kind, in the middle segment).
KINDS = {
    "fixed field data": "segments/#1/fields/h/c/0/0",
    "scalar field data": "segments/#1/fields/lab/c/0",
    "keys": "segments/#1/keys/c/0/0",
    "ragged values": "segments/#1/fields/tok/values/c/0/0",
    "ragged offsets": "segments/#1/fields/tok/offsets/c/0",
    "quantised codes": "segments/#1/fields/q/values/c/0/0",
    "quantised scales": "segments/#1/fields/q/scales/c/0",
    "index prefixes": "indexes/#1/prefix/c/0",
    "index rows": "indexes/#1/row/c/0",
    "view rows": "views/#order/row/c/0",
    "view side column": "views/#order/fields/side/c/0",
    "view item keys": "views/#order/item_key/c/0/0",
    "array zarr.json": "segments/#1/fields/h/zarr.json",
    "ragged array zarr.json": "segments/#1/fields/tok/offsets/zarr.json",
    "group zarr.json": "segments/#1/fields/zarr.json",
    "segment zarr.json": "segments/#1/zarr.json",
    "index zarr.json": "indexes/#1/zarr.json",
    "view zarr.json": "views/#order/zarr.json",
    "root manifest": "zarr.json",
    "lock": "lock/zarr.json",
}
DAMAGES = ["bitflip", "truncate", "zero_page", "append", "delete", "swap"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("corrupt-templates")
    build(d / "good", 0)
    build(d / "other", OTHER)
    good, other = roles(d / "good"), roles(d / "other")
    assert set(KINDS.values()) <= set(good), sorted(good)
    return {"good": d / "good", "other": d / "other", "good_roles": good, "other_roles": other}


def damage(path: Path, how: str, rng: random.Random, other: Path | None) -> str | None:
    """Damage the file at ``path``; returns a description, or None if ``how`` changes nothing here."""
    data = path.read_bytes()
    if how == "bitflip":
        i = rng.randrange(len(data))
        bit = rng.randrange(8)
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :])
        return f"flipped bit {bit} of byte {i}"
    if how == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(data[:n])
        return f"truncated to {n} of {len(data)} bytes"
    if how == "zero_page":
        pages = [p for p in range(0, len(data), 4096) if any(data[p : p + 4096])]
        p = rng.choice(pages)
        path.write_bytes(data[:p] + bytes(len(data[p : p + 4096])) + data[p + 4096 :])
        return f"zeroed the page at {p}"
    if how == "append":
        path.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        return "appended garbage"
    if how == "delete":
        path.unlink()
        return "deleted"
    if how == "swap":
        assert other is not None
        if other.read_bytes() == data:
            return None  # the other store's file is byte-identical (for example a group document)
        shutil.copyfile(other, path)
        return "replaced by the other store's file"
    raise AssertionError(how)


def reads_in_child(path: Path, verify_reads: bool) -> dict[str, Any]:
    out = str(path) + f".reads-{int(verify_reads)}.json"
    p = h.start(h.read_outcome, str(path), N, verify_reads, out)
    p.join(120)
    assert p.exitcode is not None and p.exitcode >= 0, f"reading the damaged store killed the process: {p.exitcode}"
    assert p.exitcode == 0, f"child failed with exit code {p.exitcode}"
    with open(out) as f:
        return json.load(f)


def corruption_case(stores: dict[str, Any], case_dir: Path, kind: str, how: str, seed: int) -> str:
    rng = random.Random(seed)
    role = KINDS[kind]
    store = case_dir / "s"
    shutil.copytree(stores["good"], store)
    target = store / stores["good_roles"][role]
    other = stores["other"] / stores["other_roles"][role] if role in stores["other_roles"] else None
    what = damage(target, how, rng, other)
    if what is None:
        return "not applicable"
    h.count("corruptions")
    where = f"{kind} ({role}) {what}"

    if kind == "lock":  # the lock's content is never trusted: harmless
        h.check_store(store, {N})
        with actstore.open(store, mode="a"):
            pass
        h.check_store(store, {N})
        h.count("corruptions_detected")
        h.count("corruptions_harmless")
        verdict = "harmless"
    elif kind == "root manifest":
        try:
            s = actstore.open(store)
        except (actstore.CorruptStoreError, actstore.UnsupportedFormatError, actstore.StoreNotFoundError):
            verdict = "open refused"
        else:
            # Still a valid manifest: a flip in metadata that no read depends on (a date, the
            # generation, attrs), or one that verify and reads must catch.
            try:
                s.verify()
            except actstore.CorruptStoreError:
                verdict = "verify refused"
            else:
                h.assert_rows(s, N)
                verdict = "harmless"
                h.count("corruptions_harmless")
            s.close()
        h.count("corruptions_detected")
    else:
        verdict = _expect_verify_names(store, target, where)

    for verify_reads in (False, True):
        r = reads_in_child(store, verify_reads)
        if verify_reads:
            assert r["outcome"] in ("exact", "raised"), f"{where}: with verify_reads=True the reads gave {r}"
            if kind == "root manifest" and verdict == "open refused":
                assert r["outcome"] == "raised"
            h.count("corruptions_reads_safe")
        else:
            h.count(f"plain_reads_{r['outcome'].replace(' ', '_')}")
            assert r["outcome"] != "other error", f"{where}: plain reads failed with a non-actstore error: {r}"
            if r["outcome"] == "wrong values":
                # Only where the damage is in bytes the reader maps but does not check without
                # verify_reads (data, keys, offsets, index, views): verify finds all of it.
                assert kind in SILENT_WITHOUT_VERIFY_READS, f"{where}: plain reads gave {r}"
    return verdict


#: Kinds whose damage plain reads (without ``verify_reads``) may not notice.
SILENT_WITHOUT_VERIFY_READS = {
    "fixed field data", "scalar field data", "keys", "ragged values", "ragged offsets",
    "index prefixes", "index rows", "view rows", "quantised codes", "quantised scales",
}


def _expect_verify_names(store: Path, target: Path, where: str) -> str:
    # open() maps index runs and views, so it may refuse the store itself.
    with pytest.raises(actstore.CorruptStoreError) as info, actstore.open(store) as s:
        s.verify()
    msg = str(info.value)
    rel = os.path.relpath(target, store)
    names = {rel, os.path.dirname(rel) + "/zarr.json"}
    obj_dir = "/".join(rel.split("/")[:2])
    names.add(obj_dir + "/zarr.json")  # a damaged array document is reported through the object's metadata
    assert any(n in msg for n in names), f"{where}: verify did not name the file: {msg}"
    h.count("corruptions_detected")
    return "verify refused"


CASES = [(k, d) for k in KINDS for d in DAMAGES]


@pytest.mark.parametrize("kind,how", CASES, ids=[f"{k.replace(' ', '_')}-{d}" for k, d in CASES])
def test_corruption(stores: dict[str, Any], tmp_path: Path, kind: str, how: str) -> None:
    corruption_case(stores, tmp_path, kind, how, seed=zlib.crc32(f"{kind}/{how}".encode()))  # (stable across runs)


@pytest.mark.slow
def test_corruption_many(stores: dict[str, Any], tmp_path: Path) -> None:
    """Every kind of file, every damage, 6 random instances each."""
    verdicts: dict[str, int] = {}
    for kind, how in CASES:
        for seed in range(6):
            d = tmp_path / f"{kind.replace(' ', '_')}-{how}-{seed}"
            try:
                v = corruption_case(stores, d, kind, how, seed + 100)
            except BaseException as e:
                raise AssertionError(f"{kind} / {how} / seed {seed}: {e}") from e
            verdicts[v] = verdicts.get(v, 0) + 1
            shutil.rmtree(d)
    print("corruption verdicts:", verdicts)


def test_verify_reads_travels_to_workers(stores: dict[str, Any], tmp_path: Path) -> None:
    """A handle pickled to a DataLoader worker keeps verify_reads; damaged bytes raise there too."""
    import pickle

    store = tmp_path / "s"
    shutil.copytree(stores["good"], store)
    damage(store / stores["good_roles"][KINDS["fixed field data"]], "bitflip", random.Random(1), None)
    with actstore.open(store, verify_reads=True) as s:
        clone = pickle.loads(pickle.dumps(s))
    with pytest.raises(actstore.CorruptStoreError, match="checksum"):
        clone.gather(np.arange(N))
    with actstore.open(store) as s:  # without it the flipped bit is returned as data
        assert pickle.loads(pickle.dumps(s)).gather(np.arange(N)) is not None
