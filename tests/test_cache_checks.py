"""The chunk cache of a remote store trusts a cached file only after checking it, once per file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
import actstore.storage.chunkcache as chunkcache_mod
from actstore import Field
from actstore.errors import CorruptStoreError
from actstore.testing.s3_server import SeaweedS3

FIELDS = {"h": Field((4,), "float32"), "tok": Field((None, 3), "float16")}
ROWS = 50


def values(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
    return [actstore.key(i) for i in range(lo, hi)], {
        "h": np.zeros((hi - lo, 4), np.float32) + np.arange(lo, hi, dtype=np.float32)[:, None],
        "tok": [np.full((1 + i % 3, 3), i, np.float16) for i in range(lo, hi)],
    }


@pytest.fixture
def remote(s3_url: str, s3_server: SeaweedS3, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    opts = s3_server.storage_options
    with actstore.create(s3_url, FIELDS, cache_dir=tmp_path / "writer-cache", storage_options=opts) as w:
        w.append(*values(0, ROWS))
        w.commit()
    return s3_url, opts


def assert_exact(store: actstore.ActivationStore) -> None:
    got = store.gather(np.arange(ROWS))
    _, want = values(0, ROWS)
    assert np.array_equal(got["h"].numpy(), want["h"])
    for i in range(ROWS):
        assert np.array_equal(got["tok"][i].numpy(), want["tok"][i]), i


def cached(cache: Path, rel: str) -> Path:
    (seg,) = [d for d in os.listdir(cache / "store" / "segments") if d != "zarr.json"]
    return cache / "store" / "segments" / seg / rel


def overwrite_same_size(path: Path, value: float) -> None:
    """Other bytes of the same size, and the old mtime put back (only the ctime tells)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[: 4 * 4] = np.full(4, value, np.float32).tobytes()  # row 0 of h
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_cached_file_is_checked_and_fetched_again(remote: tuple[str, dict[str, Any]], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, opts = remote
    cache = tmp_path / "cache"
    with actstore.open(url, cache_dir=cache, storage_options=opts) as r:
        assert_exact(r)  # fills the cache
    data = cached(cache, "fields/h/c/0/0")
    overwrite_same_size(data, 100.0)
    with actstore.open(url, cache_dir=cache, storage_options=opts) as r:
        assert r[0]["h"].tolist() == [0.0] * 4  # the remote's 0.0, not the cached 100.0
        assert_exact(r)
        assert r.verify().rows == ROWS
    hashed: list[str] = []
    real = chunkcache_mod.hash_file

    def counting(path: str, size: int) -> str:
        hashed.append(path)
        return real(path, size)

    monkeypatch.setattr(chunkcache_mod, "hash_file", counting)
    with actstore.open(url, cache_dir=cache, storage_options=opts) as r:
        assert_exact(r)
    assert hashed == []  # a checked file is trusted by its marker: hashed once, not once per process


def test_verify_reports_a_cached_copy_damaged_after_it_was_checked(remote: tuple[str, dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    url, opts = remote
    cache = tmp_path / "cache"
    r = actstore.open(url, cache_dir=cache, storage_options=opts)
    assert_exact(r)
    data = cached(cache, "fields/h/c/0/0")
    overwrite_same_size(data, 100.0)
    with pytest.raises(CorruptStoreError, match="cached copy"):
        r.verify()
    assert r.verify().rows == ROWS  # fetched again: the cache is sound now
    assert_exact(r)  # and this handle reads the fresh copy
    r.close()
    marker = json.loads(next((cache / "verified").iterdir()).read_text())
    assert {"blake3", "size", "ino", "mtime_ns", "ctime_ns"} <= set(marker)


def test_a_torn_file_in_a_cache_two_processes_fill_at_once_is_never_trusted(remote: tuple[str, dict[str, Any]],
                                                                           tmp_path: Path) -> None:
    url, opts = remote
    cache = tmp_path / "cache"
    with actstore.open(url, cache_dir=cache, storage_options=opts) as r:
        r.gather([0])  # keys and h cached
    torn = cached(cache, "fields/h/c/0/0")
    size = torn.stat().st_size
    torn.write_bytes(torn.read_bytes()[: size // 2] + bytes(size - size // 2))  # a half-written file, full size
    for marker in (cache / "verified").glob("*"):
        marker.unlink()  # as if a writer had died before its check
    child = textwrap.dedent(f"""
        import json, sys, numpy as np, actstore
        with actstore.open({url!r}, cache_dir={str(cache)!r}, storage_options={opts!r}) as r:
            g = r.gather(np.arange({ROWS}))
            print(json.dumps([g["h"][:, 0].tolist(), [float(t[0, 0]) for t in g["tok"]]]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        h, tok = json.loads(out)
        assert h == list(range(ROWS)) and tok == list(range(ROWS))
    assert os.listdir(cache / "tmp") == []
