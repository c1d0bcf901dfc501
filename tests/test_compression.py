"""Compressed fields (``Field(..., compression="zstd")``): same rows as a raw store, smaller files,
checked like every other file, and readable by zarr-python (see test_store's interop test)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blake3 import blake3
from numcodecs.zstd import Zstd
from torch.utils.data import DataLoader

import actstore
from actstore import CorruptStoreError, Field, UnsupportedFormatError
from actstore.engine.read.compressed import frame_content_size


def keys(n: int, start: int = 0) -> list[bytes]:
    return [blake3(b"c%d" % i).digest() for i in range(start, start + n)]


def fields(compression: str | None) -> dict[str, Field]:
    return {
        "h": Field((6,), "float16", compression=compression),
        "tok": Field((None, 3), "bfloat16", compression=compression, level=9 if compression else 3),
        "y": Field((), "int64"),
    }


def values(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "h": rng.standard_normal((n, 6)).astype(np.float16),
        "tok": [torch.from_numpy(rng.standard_normal((int(k), 3)).astype(np.float32)).to(torch.bfloat16)
                for k in rng.integers(0, 9, n)],
        "y": rng.integers(0, 1000, n),
    }


def build(path: Path, compression: str | None, chunk_bytes: int = 64) -> actstore.ActivationStore:
    with actstore.create(path, fields(compression), chunk_bytes=chunk_bytes) as s:
        for c, n in enumerate((40, 1, 25, 0, 13)):
            if n:
                s.append(keys(n, 100 * c), values(n, c))
            s.commit()
    return actstore.open(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[actstore.ActivationStore, actstore.ActivationStore]:
    return build(tmp_path / "raw", None), build(tmp_path / "zstd", "zstd")


def same(a: Any, b: Any) -> None:
    if isinstance(a, actstore.RaggedBatch):
        assert torch.equal(a.offsets, b.offsets)
        a, b = a.values, b.values
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                       b.view(torch.int16) if b.dtype == torch.bfloat16 else b)


def test_compressed_store_reads_like_a_raw_one(pair: tuple[actstore.ActivationStore, actstore.ActivationStore]) -> None:
    raw, comp = pair
    assert len(raw) == len(comp) == 79 and comp.fields["h"].compression == "zstd"
    rng = np.random.default_rng(0)
    for rows in (np.arange(79), rng.permutation(79)[:30], np.array([78, 0, 78, 40, 41, 40]), np.array([], np.int64)):
        a, b = raw.gather(rows), comp.gather(rows)
        for name in raw.fields:
            same(a[name], b[name])
    for i in (0, 39, 40, 41, 78, -1):
        for name in raw.fields:
            same(raw[i][name], comp[i][name])
    for ra, rb in zip(raw.iter_rows(), comp.iter_rows(), strict=True):
        for name in raw.fields:
            same(ra[name], rb[name])
    np.testing.assert_array_equal(raw.lookup(keys(3, 200)), comp.lookup(keys(3, 200)))


def test_rows_of_a_compressed_store_are_private_copies(pair: tuple[actstore.ActivationStore, actstore.ActivationStore]) -> None:
    _, comp = pair
    before = comp[3]["h"].clone()
    row = comp[3]["h"]
    row += 1  # writable, and changing it changes nothing stored or cached
    assert torch.equal(comp[3]["h"], before)


def test_dataset_and_collate_over_a_compressed_store(pair: tuple[actstore.ActivationStore, actstore.ActivationStore]) -> None:
    raw, comp = pair
    batches = []
    for store in pair:
        ds = actstore.ActivationDataset(store)
        dl = DataLoader(ds, batch_size=16, sampler=actstore.ChunkShuffleSampler(ds, seed=3), collate_fn=actstore.collate)
        batches.append(list(dl))
    for a, b in zip(*batches, strict=True):
        for name in ("h", "y"):
            same(a[name], b[name])
        same(a["tok"].values, b["tok"].values)
        assert torch.equal(a["tok"].mask, b["tok"].mask)


def test_compression_saves_space_on_compressible_rows(tmp_path: Path) -> None:
    sizes = {}
    for comp in (None, "zstd"):
        with actstore.create(tmp_path / str(comp), {"h": Field((256,), "float16", compression=comp)}) as s:
            x = np.repeat(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float16), 32, axis=1)
            s.append(keys(2000), {"h": x})
        sizes[comp] = actstore.open(tmp_path / str(comp)).info()["bytes_on_disk"]
    assert sizes["zstd"] < sizes[None] / 4, sizes
    info = actstore.open(tmp_path / "zstd").info()
    assert info["fields"]["h"]["compression"] == "zstd level 3" and "zstd" in info["layout"]


def test_verify_and_damage(tmp_path: Path) -> None:
    s = build(tmp_path / "s", "zstd")
    assert s.verify().problems == []
    seg = s.manifest.segments[0]
    shard = Path(s.path) / "segments" / seg.id / "fields" / "h" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="h"):
        actstore.open(s.path).verify()
    # A truncated file: a clear error when the array is opened, never a crash.
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptStoreError):
        actstore.open(s.path).gather(np.arange(40), "h")
    # A frame replaced by one that decodes to another size.
    shard.write_bytes(bytes(data))
    idx_bytes = 16 * (-(-40 // (64 // 12))) + 4
    body = bytes(data[: len(data) - idx_bytes])
    bomb = Zstd(level=1).encode(bytes(1 << 20))
    damaged = bomb + body[len(bomb):] if len(bomb) < len(body) else body
    shard.write_bytes(damaged + bytes(data[len(data) - idx_bytes:]))
    with pytest.raises(CorruptStoreError, match="cannot be decoded|checksum"):
        actstore.open(s.path).gather(np.arange(40), "h")


def test_field_options_are_checked_and_recorded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        Field((3,), compression="gzip")
    with pytest.raises(ValueError, match="level"):
        Field((3,), compression="zstd", level=99)
    assert Field((3,)) == Field((3,), level=9)  # the level means nothing without compression
    assert Field((3,), compression="zstd") != Field((3,))
    path = tmp_path / "s"
    actstore.create(path, {"h": Field((3,), compression="zstd", level=7)}).close()
    doc = json.loads((path / "zarr.json").read_text())
    assert doc["attributes"]["actstore"]["fields"]["h"] == {"shape": [3], "dtype": "float32",
                                                            "compression": {"name": "zstd", "level": 7}}
    assert actstore.open(path).fields["h"] == Field((3,), compression="zstd", level=7)
    doc["attributes"]["actstore"]["fields"]["h"]["compression"]["name"] = "lz5"
    (path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormatError, match="lz5"):
        actstore.open(path)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 300, 65791, 65792, 1 << 20])
def test_frame_content_size(n: int) -> None:
    for level in (1, 19):
        frame = Zstd(level=level).encode(os.urandom(n) if n < 4096 else bytes(n))
        assert frame_content_size(memoryview(frame)) == n
    with pytest.raises(ValueError):
        frame_content_size(memoryview(b"not a frame at all"))


def test_precompute_writes_compressed_fields(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    data = [(torch.full((4,), float(i)), i % 3) for i in range(50)]
    raw = actstore.precompute(model, data, tmp_path / "raw", layers="1", progress=False)
    comp = actstore.precompute(model, data, tmp_path / "zstd", layers="1", compression="zstd", progress=False)
    assert comp.fields["1"].compression == "zstd" and raw.fields["1"].compression is None
    assert comp.fields["1"].shape == raw.fields["1"].shape
    rows = np.arange(50)
    assert torch.equal(raw.gather(rows)["1"], comp.gather(rows)["1"])  # type: ignore[arg-type]
    with pytest.raises(actstore.StoreExistsError, match="compression"):
        actstore.precompute(model, data[:60], tmp_path / "raw", layers="1", compression="zstd", progress=False)
    with pytest.raises(ValueError, match="compression"):
        actstore.precompute(model, data, tmp_path / "x", compression="lz4", progress=False)


def test_scalar_compressed_field_rows_are_tensors(tmp_path: Path) -> None:
    with actstore.create(tmp_path / "s", {"y": Field((), "int64", compression="zstd")}) as s:
        s.append(keys(10), {"y": np.arange(10)})
    s = actstore.open(tmp_path / "s")
    row = s[3]["y"]
    assert isinstance(row, torch.Tensor) and row.shape == () and int(row) == 3
    assert s.gather([9, 0])["y"].tolist() == [9, 0]


def test_compressed_rows_refuse_what_they_do_not_support(tmp_path: Path) -> None:
    s = build(tmp_path / "s", "zstd")
    arr = s._snap.segments[0].fixed("h")  # the CompressedRows behind field h of segment 0 (40 rows)
    assert np.array_equal(np.take(arr, [3, 1], axis=0), np.asarray(arr)[[3, 1]])
    assert np.array_equal(np.take(arr, [3, 1]), np.asarray(arr).ravel()[[3, 1]])  # numpy's default: flattened
    assert np.array_equal(arr[np.array([2, -1])], np.asarray(arr)[[2, -1]])
    for bad in (np.ones(40, bool), (3, 2), 1.5, np.array([0.5])):
        with pytest.raises(TypeError):
            arr[bad]
    with pytest.raises(TypeError):
        np.concatenate([arr, arr])
    with pytest.raises(IndexError):
        arr[40]


def test_hostile_chunk_sizes_are_refused_before_allocating(tmp_path: Path) -> None:
    """A zarr.json claiming huge inner chunks, or a frame claiming a huge content size: CorruptStoreError."""
    s = build(tmp_path / "s", "zstd")
    seg = Path(s.path) / "segments" / s.manifest.segments[0].id / "fields" / "h"
    doc = json.loads((seg / "zarr.json").read_text())
    big = 10**12
    doc["codecs"][0]["configuration"]["chunk_shape"][0] = big
    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = big
    (seg / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError):
        actstore.open(s.path).gather(np.arange(5), "h")
    # A tiny frame that declares 1 GiB of content, placed where the index points.
    s = build(tmp_path / "t", "zstd")
    shard = Path(s.path) / "segments" / s.manifest.segments[0].id / "fields" / "h" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    header = struct.pack("<IB", 0xFD2FB528, 0b11100000) + (1 << 30).to_bytes(8, "little")
    data[: len(header)] = header
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="cannot be decoded"):
        actstore.open(s.path).gather(np.arange(5), "h")


def test_create_refuses_inner_chunks_too_large_to_decode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at most"):
        actstore.create(tmp_path / "s", {"h": Field((4,), compression="zstd")}, chunk_bytes=1 << 31)
    actstore.create(tmp_path / "raw", {"h": Field((4,))}, chunk_bytes=1 << 31).close()  # raw fields: no limit
