"""Stores on object storage, against a real S3 server (SeaweedFS on loopback; see tests/s3_server.py)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
import actstore.store
from actstore import Field
from actstore.cli import main as cli_main
from actstore.errors import MissingDependencyError, RemoteError, StoreLockedError
from actstore.storage.chunkcache import ChunkCache
from actstore.storage.objects import ObjectStore
from actstore.store import ActivationStore as RemoteStore
from actstore.store import open as open_remote
from actstore.testing.s3_server import SeaweedS3, free_ports

FIELDS = {"h": Field((4,), "float32"), "tok": Field((None, 3), "float16"), "label": Field((), "int64")}


def batch(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
    rng = np.random.default_rng(lo)
    keys = [actstore.key(i) for i in range(lo, hi)]
    return keys, {
        "h": rng.standard_normal((hi - lo, 4)).astype(np.float32),
        "tok": [rng.standard_normal((i % 5, 3)).astype(np.float16) for i in range(lo, hi)],
        "label": np.arange(lo, hi),
    }


@pytest.fixture
def opts(s3_server: SeaweedS3) -> dict[str, Any]:
    return s3_server.storage_options


def make(url: str, tmp_path: Path, opts: dict[str, Any], parts: list[tuple[int, int]], **kw: Any) -> RemoteStore:
    store = actstore.create(url, FIELDS, cache_dir=tmp_path / "writer-cache", storage_options=opts, **kw)
    assert isinstance(store, RemoteStore)
    for lo, hi in parts:
        keys, values = batch(lo, hi)
        store.append(keys, values)
        store.commit()
    return store


def assert_same(a: actstore.ActivationStore, b: actstore.ActivationStore) -> None:
    assert len(a) == len(b)
    rows = np.arange(len(a))
    ga, gb = a.gather(rows), b.gather(rows)
    for name in ga:
        x, y = ga[name], gb[name]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert torch.equal(x.values, y.values) and torch.equal(x.offsets, y.offsets), name
    assert np.array_equal(a.key_at(rows), b.key_at(rows))


# --- the round trip -----------------------------------------------------------------------------


def test_round_trip_equals_a_local_store(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    writer = make(s3_url, tmp_path, opts, [(0, 40), (40, 100)])
    writer.set_view("rev", np.arange(100)[::-1])
    writer.commit()
    local = actstore.create(tmp_path / "local", FIELDS)
    for lo, hi in [(0, 40), (40, 100)]:
        local.append(*batch(lo, hi))
        local.commit()
    reader = actstore.open(s3_url, cache_dir=tmp_path / "reader-cache", storage_options=opts)
    assert isinstance(reader, RemoteStore) and reader.generation == writer.generation == 3
    assert_same(reader, local)
    keys, _ = batch(0, 100)
    values = {"h": np.concatenate([batch(0, 40)[1]["h"], batch(40, 100)[1]["h"]])}
    assert reader.lookup(keys[55:57] + [actstore.key("absent")]).tolist() == [55, 56, -1]
    assert torch.equal(reader.get(keys[70])["h"], torch.from_numpy(values["h"][70]))
    assert torch.equal(reader.get(keys[70])["tok"], local.get(keys[70])["tok"])
    assert reader.view("rev")[:3].tolist() == [99, 98, 97]
    assert reader[3]["label"].item() == 3
    report = reader.verify()
    assert report.rows == 100 and report.files > 0
    info = reader.info()
    assert info["path"] == s3_url and info["rows"] == 100 and info["bytes_on_disk"] > 0
    # reads are zero-copy maps of the cached files
    row = reader[5]["h"]
    mapped = reader._snap.segments[0].arrays["h"]
    assert row.data_ptr() == mapped.ctypes.data + 5 * mapped.strides[0]
    # appending again: duplicates are skipped, a reader sees the new commit after refresh()
    writer.close()
    again = actstore.open(s3_url, mode="a", cache_dir=tmp_path / "writer-cache", storage_options=opts)
    assert again.append(*batch(90, 120)) == 20
    again.commit()
    again.close()
    assert reader.refresh() and len(reader) == 120
    assert reader.lookup([actstore.key(119)]).tolist() == [119]
    reader.close()


def test_credentials_and_endpoint_from_the_environment(s3_url: str, tmp_path: Path, s3_server: SeaweedS3,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    make(s3_url, tmp_path, {}, [(0, 10)]).close()
    with actstore.open(s3_url, cache_dir=tmp_path / "c") as store:
        assert len(store) == 10
    monkeypatch.setenv("ACTSTORE_CACHE_DIR", str(tmp_path / "default-cache"))
    with actstore.open(s3_url) as store:  # the default cache: $ACTSTORE_CACHE_DIR/<hash of URL and endpoint>
        store.gather([1, 2])
        assert store.cache.dir.startswith(str(tmp_path / "default-cache"))
    # the command line
    assert cli_main(["info", s3_url]) == 0
    assert cli_main(["verify", "-q", s3_url]) == 0


def test_read_through_zarr_without_a_cache(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    make(s3_url, tmp_path, opts, [(0, 30), (30, 50)]).close()
    cached = actstore.open(s3_url, cache_dir=tmp_path / "c", storage_options=opts)
    lazy = actstore.open(s3_url, cache_dir=False, storage_options=opts)
    assert_same(lazy, cached)
    assert lazy.lookup([actstore.key(42)]).tolist() == [42]
    assert torch.equal(lazy[33]["tok"], cached[33]["tok"])
    assert not any((Path(lazy.path) / "segments").rglob("c"))  # no segment data on the local disk
    lazy.verify()
    lazy.close()
    cached.close()


def test_pickled_to_a_worker(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    from actstore.training.datasets import ActivationDataset

    make(s3_url, tmp_path, opts, [(0, 20)]).close()
    store = actstore.open(s3_url, cache_dir=tmp_path / "c", storage_options=opts)
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, RemoteStore) and clone.url == s3_url
    assert_same(clone, store)
    ds = pickle.loads(pickle.dumps(ActivationDataset(store)))  # re-opened lazily, as in a DataLoader worker
    assert isinstance(ds.store, RemoteStore)
    assert torch.equal(ds[7]["h"], store[7]["h"])
    checked = actstore.open(s3_url, cache_dir=tmp_path / "c", storage_options=opts, verify_reads=True)
    assert_same(checked, store)
    assert pickle.loads(pickle.dumps(checked))._check is not None  # verify_reads travels to workers


# --- the chunk cache ------------------------------------------------------------------------------


def test_lru_eviction_under_a_small_cache(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    make(s3_url, tmp_path, opts, [(i * 50, i * 50 + 50) for i in range(6)]).close()
    ref = actstore.open(s3_url, cache_dir=tmp_path / "full", storage_options=opts)
    seg_bytes = 50 * 4 * 4 + 16 + 4  # one segment's h shard (rows, shard index, crc)
    store = actstore.open(s3_url, cache_dir=tmp_path / "small", cache_bytes=int(2.5 * seg_bytes), storage_options=opts)
    for s in range(6):
        rows = np.arange(s * 50, s * 50 + 50)
        assert torch.equal(store.gather(rows, "h")["h"], ref.gather(rows, "h")["h"])
        assert store.cache.used_bytes() <= store.cache.cache_bytes
    fetched = store.cache.fetched_bytes
    assert torch.equal(store.gather(np.arange(0, 300, 7), "h")["h"], ref.gather(np.arange(0, 300, 7), "h")["h"])
    assert store.cache.fetched_bytes > fetched  # evicted files came back
    assert store.cache.used_bytes() <= store.cache.cache_bytes


def test_prefetch_warms_the_cache(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    make(s3_url, tmp_path, opts, [(0, 30), (30, 60), (60, 90)]).close()
    store = actstore.open(s3_url, cache_dir=tmp_path / "c", storage_options=opts)
    order = np.random.default_rng(0).permutation(90)
    got = store.prefetch(order, ["h", "tok"]).wait(60)
    assert got > 0
    before = store.cache.fetched_bytes
    store.gather(order, ["h", "tok"])
    assert store.cache.fetched_bytes == before  # every read came from the cache


# --- commits and the lock ---------------------------------------------------------------------------


def test_a_failed_upload_is_never_half_visible(s3_url: str, tmp_path: Path, opts: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    writer = make(s3_url, tmp_path, opts, [(0, 20)])
    real_upload = ObjectStore.upload

    def half_upload(self: ObjectStore, pairs: Any) -> None:
        pairs = list(pairs)
        real_upload(self, pairs[: len(pairs) // 2])
        raise RemoteError("injected: the network went away mid-commit")

    monkeypatch.setattr(ObjectStore, "upload", half_upload)
    writer.append(*batch(20, 40))
    with pytest.raises(RemoteError, match="injected"):
        writer.commit()
    reader = actstore.open(s3_url, cache_dir=tmp_path / "r", storage_options=opts)
    assert reader.generation == 1 and len(reader) == 20  # the old commit, whole
    reader.verify()
    monkeypatch.setattr(ObjectStore, "upload", real_upload)
    writer.commit()  # nothing new pending: uploads the failed commit again
    assert reader.refresh() and len(reader) == 40
    reader.verify()
    writer.close()


def test_killed_writer_between_uploads(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    make(s3_url, tmp_path, opts, [(0, 20)]).close()
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        import actstore
        from actstore.storage.objects import ObjectStore
        from actstore.store import open as open_remote
        from tests.test_remote import batch
        real = ObjectStore.upload
        def upload(self, pairs):
            pairs = list(pairs)
            real(self, pairs[:3])
            os.kill(os.getpid(), signal.SIGKILL)
        ObjectStore.upload = upload
        w = open_remote({s3_url!r}, "a", cache_dir={str(tmp_path / 'child')!r}, storage_options={opts!r},
                        lease_seconds=5)
        w.append(*batch(20, 40))
        w.commit()
    """)
    proc = subprocess.run([sys.executable, "-c", child], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with pytest.raises(StoreLockedError, match=r"pid \d+ on host"):  # the dead writer's lease is still live
        open_remote(s3_url, "a", cache_dir=tmp_path / "w", storage_options=opts)
    reader = actstore.open(s3_url, cache_dir=tmp_path / "r", storage_options=opts)
    assert len(reader) == 20
    objects = ObjectStore(s3_url, opts)

    def segments_with_objects() -> set[str]:  # (SeaweedFS lists emptied prefixes as directories for a while)
        return {p.split("/segments/")[1].split("/")[0] for p in objects.fs.find(objects.path("segments"))} - {"zarr.json"}

    assert len(segments_with_objects()) == 2  # the committed segment and the dead writer's partial upload
    deadline = time.monotonic() + 30
    while True:  # until the 5 s lease (+1 s slack) expires
        try:
            writer = open_remote(s3_url, "a", cache_dir=tmp_path / "w", storage_options=opts)
            break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert len(segments_with_objects()) == 1  # the partial upload was removed on open
    writer.append(*batch(20, 40))
    writer.close()
    assert reader.refresh() and len(reader) == 40
    reader.verify()


def test_second_writer_is_refused_and_a_lost_lease_cannot_commit(s3_url: str, tmp_path: Path,
                                                                 opts: dict[str, Any]) -> None:
    actstore.create(s3_url, FIELDS, cache_dir=tmp_path / "a", storage_options=opts).close()
    a = open_remote(s3_url, "a", cache_dir=tmp_path / "a", storage_options=opts, lease_seconds=3)
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on host"):
        actstore.open(s3_url, mode="a", cache_dir=tmp_path / "b", storage_options=opts)
    time.sleep(4.5)  # a keeps renewing (every second): still locked after its lease time
    with pytest.raises(StoreLockedError):
        open_remote(s3_url, "a", cache_dir=tmp_path / "b", storage_options=opts)
    assert a._writer is not None and a._writer.lock is not None
    a._writer.lock.lease._stop.set()  # a freezes: no more renewals
    time.sleep(3)
    deadline = time.monotonic() + 30
    while True:  # takes over the expired lease (3 s + 1 s slack, on the server's 1 s-resolution clock)
        try:
            b = open_remote(s3_url, "a", cache_dir=tmp_path / "b", storage_options=opts)
            break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    a.append(*batch(0, 10))
    with pytest.raises(StoreLockedError, match="taken over"):
        a.commit()  # the fence: a lost lease never writes the manifest
    b.append(*batch(100, 110))
    b.close()
    reader = actstore.open(s3_url, cache_dir=tmp_path / "r", storage_options=opts)
    assert reader.lookup([actstore.key(100), actstore.key(0)]).tolist() == [0, -1]
    with pytest.raises(StoreLockedError):
        a.close()


def test_create_refuses_existing_and_foreign_prefixes(s3_url: str, tmp_path: Path, opts: dict[str, Any],
                                                      s3_server: SeaweedS3) -> None:
    make(s3_url, tmp_path, opts, [(0, 5)]).close()
    with pytest.raises(actstore.StoreExistsError):
        actstore.create(s3_url, FIELDS, cache_dir=tmp_path / "x", storage_options=opts)
    with actstore.create(s3_url, FIELDS, exist_ok=True, cache_dir=tmp_path / "x", storage_options=opts) as s:
        assert len(s) == 5
    bucket = s3_url.split("/")[2]
    s3_server.client().put_object(Bucket=bucket, Key="other/data.bin", Body=b"x")
    with pytest.raises(actstore.StoreExistsError, match="other objects"):
        actstore.create(f"s3://{bucket}", FIELDS, cache_dir=tmp_path / "y", storage_options=opts)
    with pytest.raises(actstore.StoreNotFoundError):
        actstore.open(f"s3://{bucket}/nothing-here", cache_dir=tmp_path / "z", storage_options=opts)
    with pytest.raises(actstore.StoreError, match="cache of another store"):
        actstore.open(s3_url, cache_dir=tmp_path / "x", storage_options=opts).close()
        ChunkCache(ObjectStore(f"s3://{bucket}/another", opts), str(tmp_path / "x"))


def test_damaged_remote_bytes_are_detected(s3_url: str, tmp_path: Path, opts: dict[str, Any],
                                           s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    make(s3_url, tmp_path, opts, [(0, 20)]).close()
    objects = ObjectStore(s3_url, opts)
    seg = next(n for n in objects.listdir("segments") if n != "zarr.json")
    rel = f"segments/{seg}/fields/h/c/0/0"
    data = bytearray(objects.read(rel))
    data[10] ^= 0xFF
    objects.put(rel, bytes(data))
    with pytest.raises(actstore.CorruptStoreError, match="checksum mismatch"):
        actstore.open(s3_url, cache_dir=tmp_path / "r", storage_options=opts).verify()
    fresh = actstore.open(s3_url, cache_dir=tmp_path / "r2", storage_options=opts)
    with pytest.raises(actstore.CorruptStoreError, match="remote bytes differ"):
        fresh.gather([0])  # never wrong values: the download is checked before it is mapped
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ACTSTORE_CACHE_DIR", str(tmp_path / "cli-cache"))
    assert cli_main(["verify", "-q", s3_url]) == 1


# --- bad input ------------------------------------------------------------------------------------------


def test_unknown_scheme_names_the_package() -> None:
    with pytest.raises(MissingDependencyError, match="gcsfs"):
        actstore.open("gs://bucket/store")
    with pytest.raises(MissingDependencyError, match="nosuch://"):
        actstore.open("nosuch://bucket/store")


def test_wrong_credentials_fail_fast(s3_url: str, tmp_path: Path, s3_server: SeaweedS3) -> None:
    bad = {"key": "wrong", "secret": "wrong", "endpoint_url": s3_server.endpoint}
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="credentials"):
        actstore.open(s3_url, cache_dir=tmp_path / "c", storage_options=bad)
    with pytest.raises(RemoteError, match="credentials"):
        actstore.create(s3_url, FIELDS, cache_dir=tmp_path / "c", storage_options=bad)
    assert time.monotonic() - t0 < 20


def test_unreachable_endpoint_fails_in_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    port = free_ports(1)[0]  # nothing listens there
    opts = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 2, "mode": "standard"}}}
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach"):
        actstore.open("s3://bucket/store", cache_dir=tmp_path / "c", storage_options=opts)
    assert time.monotonic() - t0 < 30


def test_push_a_local_store(s3_url: str, tmp_path: Path, s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    local = actstore.create(tmp_path / "local", FIELDS, fingerprint="model-x")
    for lo, hi in [(0, 30), (30, 45)]:
        local.append(*batch(lo, hi))
        local.commit()
    local.set_view("dataset", np.array([3, 1, -1, 44]))
    local.close()
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ACTSTORE_CACHE_DIR", str(tmp_path / "cache"))
    assert cli_main(["push", str(tmp_path / "local"), s3_url]) == 0
    remote = actstore.open(s3_url, cache_dir=tmp_path / "r", fingerprint="model-x")
    assert_same(remote, actstore.open(tmp_path / "local"))
    assert remote.view("dataset").tolist() == [3, 1, -1, 44]
    assert actstore.store.push(tmp_path / "local", s3_url) == 0  # everything is there already


def test_the_remote_module_is_a_deprecated_alias(s3_url: str, tmp_path: Path, opts: dict[str, Any]) -> None:
    import actstore.remote as legacy

    with pytest.warns(DeprecationWarning, match=r"use actstore\.ActivationStore"):
        assert legacy.RemoteStore is actstore.ActivationStore
    with pytest.warns(DeprecationWarning, match=r"use actstore\.store\.push"):
        assert legacy.push is actstore.store.push
    with pytest.warns(DeprecationWarning, match=r"use actstore\.create"):
        w = legacy.create_remote(s3_url, FIELDS, cache_dir=tmp_path / "w", storage_options=opts, lease_seconds=5)
    w.append(*batch(0, 10))
    w.close()
    with pytest.warns(DeprecationWarning, match=r"use actstore\.open"):
        r = legacy.open_remote(s3_url, cache_dir=tmp_path / "r", storage_options=opts)
    assert len(r) == 10
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="object-storage URL"):
        legacy.open_remote(str(tmp_path / "local"))
