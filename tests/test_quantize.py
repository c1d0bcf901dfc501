"""Quantised fields (``Field(..., quantize="int8" | "float8_e4m3")``, FORMAT.md §4.1): golden bytes, round trips
within the documented error, every read path, compaction, verify, zarr-python, precompute and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import actstore
from actstore import CorruptStoreError, Field
from actstore.engine.read.gather import gather_fixed, gather_padded
from actstore.format.quantize import SCHEMES, dequantize, quantize

SCHEME_NAMES = list(SCHEMES)


def keys(n: int, start: int = 0) -> list[bytes]:
    return [blake3(b"q%d" % i).digest() for i in range(start, start + n)]


def fields(scheme: str | None) -> dict[str, Field]:
    return {"h": Field((6,), "float32", quantize=scheme), "tok": Field((None, 3), "float16", quantize=scheme),
            "y": Field((), "int64")}


def values(n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((n, 6)) * rng.uniform(0.01, 100, (n, 1))).astype(np.float32)
    if n > 2:
        h[2] = 0  # an all-zero row: scale 0
    return {"h": h, "tok": [rng.standard_normal((int(k), 3)).astype(np.float32) for k in rng.integers(0, 7, n)],
            "y": rng.integers(0, 1000, n)}


def build(path: Path, scheme: str | None, commits: tuple[int, ...] = (20, 1, 9, 0, 13)) -> actstore.ActivationStore:
    with actstore.create(path, fields(scheme), chunk_bytes=64) as s:
        for c, n in enumerate(commits):
            if n:
                s.append(keys(n, 100 * c), values(n, c))
            s.commit()
    return actstore.open(path)


def inputs(commits: tuple[int, ...] = (20, 1, 9, 0, 13)) -> dict[str, Any]:
    """Every appended row of :func:`build`, in row order, as float32."""
    parts = [values(n, c) for c, n in enumerate(commits) if n]
    return {"h": np.concatenate([p["h"] for p in parts]), "tok": [t for p in parts for t in p["tok"]],
            "y": np.concatenate([p["y"] for p in parts])}


def reference(x: np.ndarray, scheme: str) -> np.ndarray:
    """The documented formulas, written out in numpy (int8) / torch's float8 cast (e4m3): quantise, then dequantise."""
    x32 = x.astype(np.float32).reshape(len(x), int(np.prod(x.shape[1:])))
    qmax = np.float32(SCHEMES[scheme].qmax)
    scale = (np.abs(x32).max(axis=1) if x32.shape[1] else np.zeros(len(x32), np.float32)) / qmax
    y = np.clip(x32 / np.where(scale > 0, scale, np.float32(1))[:, None], -qmax, qmax)
    if scheme == "int8":
        q = np.round(y).astype(np.float32)  # numpy rounds half to even, as the format says
    else:
        q = torch.from_numpy(y).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    return (q * scale[:, None]).astype(np.float32).reshape(x.shape)


def bound(x: np.ndarray, scheme: str) -> np.ndarray:
    """Largest error the format allows for each value (int8: half a step; e4m3: 2^-4 relative, subnormal steps)."""
    x32 = x.astype(np.float32).reshape(len(x), int(np.prod(x.shape[1:])))
    scale = np.abs(x32).max(axis=1, initial=0) / SCHEMES[scheme].qmax
    if scheme == "int8":
        b = np.broadcast_to(scale[:, None] * 0.5, x32.shape)
    else:
        b = np.abs(x32) * 2.0**-4 + scale[:, None] * 2.0**-10
    return (b * (1 + 1e-5) + 1e-30).reshape(x.shape)


# --- golden bytes ---------------------------------------------------------------------------------


def test_golden_bytes(tmp_path: Path) -> None:
    """Codes, scales and metadata of a tiny store, byte for byte (FORMAT.md §4.1's worked example)."""
    f = {"i8": Field((4,), "float32", quantize="int8"), "f8": Field((4,), "float16", quantize="float8_e4m3")}
    rows = {"i8": [[127.0, -63.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], "f8": [[448.0, -224.0, 1.0, 0.0], [0, 0, 0, 0]]}
    with actstore.create(tmp_path / "g", f, chunk_bytes=8) as s:
        s.append(keys(2), rows)
        s.commit()
    doc = json.loads((tmp_path / "g" / "zarr.json").read_bytes())["attributes"]["actstore"]
    assert doc["version"] == 2
    assert doc["fields"]["i8"] == {"shape": [4], "dtype": "float32", "quantize": {"name": "int8", "scales": "float32"}}
    assert doc["fields"]["f8"]["quantize"] == {"name": "float8_e4m3", "scales": "float32"}
    seg = tmp_path / "g" / "segments" / doc["segments"][0]["id"] / "fields"

    def data(rel: str, nbytes: int) -> bytes:
        return (seg / rel).read_bytes()[:nbytes]

    # int8: amax 127 -> scale 1.0; -63.5 rounds half to even, to -64; a zero row has scale 0 and codes 0
    assert data("i8/values/c/0/0", 8) == bytes([0x7F, 0xC0, 0x01, 0x00, 0, 0, 0, 0])
    assert data("i8/scales/c/0", 8) == bytes.fromhex("0000803f" "00000000")
    # float8_e4m3: amax 448 -> scale 1.0; codes are e4m3fn bit patterns (448 = 0x7E, -224 = 0xF6, 1 = 0x38)
    assert data("f8/values/c/0/0", 8) == bytes([0x7E, 0xF6, 0x38, 0x00, 0, 0, 0, 0])
    assert data("f8/scales/c/0", 8) == bytes.fromhex("0000803f" "00000000")
    meta = json.loads((seg / "i8" / "values" / "zarr.json").read_bytes())
    assert meta["data_type"] == "int8" and meta["shape"] == [2, 4]
    assert json.loads((seg / "f8" / "values" / "zarr.json").read_bytes())["data_type"] == "uint8"
    assert json.loads((seg / "i8" / "scales" / "zarr.json").read_bytes())["data_type"] == "float32"
    assert json.loads((seg / "i8" / "zarr.json").read_bytes())["node_type"] == "group"
    with actstore.open(tmp_path / "g") as s:
        got = s.gather([0, 1])
        assert got["i8"].dtype == torch.float32 and got["f8"].dtype == torch.float16
        assert got["i8"].tolist() == [[127.0, -64.0, 1.0, 0.0], [0.0] * 4]
        assert got["f8"].tolist() == [[448.0, -224.0, 1.0, 0.0], [0.0] * 4]


def test_unquantised_stores_stay_version_1(tmp_path: Path) -> None:
    s = build(tmp_path / "raw", None)
    assert json.loads((tmp_path / "raw" / "zarr.json").read_bytes())["attributes"]["actstore"]["version"] == 1
    assert s.info()["format"].startswith("actstore v1")


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_reads_follow_the_formula(tmp_path: Path, scheme: str) -> None:
    s = build(tmp_path / scheme, scheme)
    want = inputs()
    n = len(s)
    rows = np.random.default_rng(1).permutation(n)
    got = s.gather(rows)
    h_ref = reference(want["h"], scheme)
    assert got["h"].dtype == torch.float32
    assert torch.equal(got["h"], torch.from_numpy(h_ref[rows]))  # type: ignore[arg-type]
    assert np.all(np.abs(got["h"].numpy() - want["h"][rows]) <= bound(want["h"], scheme)[rows])  # type: ignore[union-attr]
    assert not got["h"][int(np.flatnonzero(rows == 2)[0])].any()  # type: ignore[index]
    tok = got["tok"]
    for i, r in enumerate(rows.tolist()):
        ref = torch.from_numpy(reference(want["tok"][r], scheme)).to(torch.float16) if len(want["tok"][r]) else None
        part = tok.values[tok.offsets[i] : tok.offsets[i + 1]]  # type: ignore[union-attr]
        assert part.dtype == torch.float16
        if ref is not None:
            assert torch.equal(part, ref)
            assert torch.equal(s[r]["tok"], ref)
        assert torch.equal(s[r]["h"], torch.from_numpy(h_ref[r]))
        assert int(s[r]["y"]) == int(want["y"][r])
    pb = s.gather_padded(rows, "tok", dtype=torch.float32, pad_value=-7)
    for i, r in enumerate(rows.tolist()):
        ln = len(want["tok"][r])
        if ln:  # read as float32: the formula's float32 result, not rounded through the field's float16
            assert torch.equal(pb.values[i, :ln], torch.from_numpy(reference(want["tok"][r], scheme)))
        assert bool((pb.values[i, ln:] == -7).all()) and int(pb.lengths[i]) == ln
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(s.gather(rows, "h", dtype=dt)["h"], torch.from_numpy(h_ref[rows]).to(dt))


@settings(max_examples=60, deadline=None)
@given(scheme=st.sampled_from(SCHEME_NAMES), n=st.integers(0, 5), d=st.integers(1, 9),
       exp=st.integers(-30, 30), seed=st.integers(0, 2**16))
def test_quantize_error_is_bounded(scheme: str, n: int, d: int, exp: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * 2.0**exp).astype(np.float32)
    x[rng.random((n, d)) < 0.2] = 0
    codes, scales = quantize(torch.from_numpy(x), SCHEMES[scheme], "x")
    out = dequantize(codes, scales, SCHEMES[scheme], torch.empty(n, d)).numpy()
    assert np.array_equal(out, reference(x, scheme))
    assert np.all(np.abs(out - x) <= bound(x, scheme))
    assert np.all(scales >= 0) and np.all(np.isfinite(scales))


def test_zero_rows_and_tokens_round_trip_to_zeros(tmp_path: Path) -> None:
    f = {"h": Field((3,), quantize="int8"), "t": Field((None, 2), quantize="float8_e4m3")}
    with actstore.create(tmp_path / "z", f) as s:
        s.append(keys(2), {"h": np.zeros((2, 3)), "t": [np.zeros((2, 2)), np.array([[0.0, -0.0], [1.0, 2.0]])]})
        s.commit()
        assert s.gather([0, 1])["h"].abs().sum() == 0  # type: ignore[union-attr]
        assert s[0]["t"].abs().sum() == 0
        assert s[1]["t"].tolist() == [[0.0, 0.0], [1.0, 2.0]]  # per-token scales: token 1's own scale


# --- other read paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_dataset_collate_and_extra_rows(tmp_path: Path, scheme: str) -> None:
    s = build(tmp_path / "q", scheme)
    ds = actstore.ActivationDataset(s)
    dl = DataLoader(ds, batch_size=8, sampler=actstore.ChunkShuffleSampler(ds, seed=3), collate_fn=actstore.collate)
    seen = 0
    for batch in dl:
        seen += len(batch["y"])
        assert batch["h"].dtype == torch.float32 and batch["tok"].values.dtype == torch.float16
    assert seen == len(s)
    # positions computed elsewhere (-1 rows) mixed with stored ones, as CachedDataset gathers them
    rows = np.array([3, -1, 0, -1])
    extra = {1: torch.ones(6), 3: torch.full((6,), 2.0)}
    out = gather_fixed(s.snapshot, "h", s.fields["h"], rows, extra=extra)
    assert torch.equal(out[0], s[3]["h"]) and torch.equal(out[2], s[0]["h"])
    assert torch.equal(out[1], extra[1]) and torch.equal(out[3], extra[3])
    tok_extra = {1: torch.ones(2, 3, dtype=torch.float16)}
    pb = gather_padded(s.snapshot, "tok", s.fields["tok"], np.array([5, -1]), extra=tok_extra)
    assert torch.equal(pb.values[1, :2], tok_extra[1]) and int(pb.lengths[1]) == 2


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_compaction_copies_codes_and_scales_exactly(tmp_path: Path, scheme: str) -> None:
    s = build(tmp_path / "q", scheme)
    rows = np.arange(len(s))
    before = s.gather(rows)
    s.close()
    with actstore.open(tmp_path / "q", mode="a") as w:
        report = w.compact()
        assert report.segments_after == 1
    s = actstore.open(tmp_path / "q")
    after = s.gather(rows)
    assert torch.equal(before["h"], after["h"])  # type: ignore[arg-type]
    assert torch.equal(before["tok"].values, after["tok"].values)  # type: ignore[union-attr]
    assert s.verify().ok


def test_adopt_a_store_with_some_keys_already_present(tmp_path: Path) -> None:
    a = build(tmp_path / "a", "int8", (20,))
    b = build(tmp_path / "b", "int8", (20, 1, 9))  # its first segment's keys are all in a
    a.close()
    with actstore.open(tmp_path / "a", mode="a") as w:
        assert w.adopt(b) == 10
    merged = actstore.open(tmp_path / "a")
    for r in range(len(b)):
        k = bytes(b.key_at([r])[0])
        assert torch.equal(merged.get(k)["h"], b[r]["h"])
        assert torch.equal(merged.get(k)["tok"], b[r]["tok"])


# --- damage and bad input ---------------------------------------------------------------------------


def test_verify_detects_damaged_scales(tmp_path: Path) -> None:
    s = build(tmp_path / "q", "int8")
    assert s.verify().ok
    seg = s.manifest.segments[0].id
    path = tmp_path / "q" / "segments" / seg / "fields" / "h" / "scales" / "c" / "0"
    data = bytearray(path.read_bytes())
    data[4] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="scales"):
        actstore.open(tmp_path / "q").verify()
    with pytest.raises(CorruptStoreError, match="scales"):  # verify_reads checks the file when it is mapped
        actstore.open(tmp_path / "q", verify_reads=True).gather([0])
    os.remove(path)
    with pytest.raises(CorruptStoreError, match="scales"):
        actstore.open(tmp_path / "q").verify()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_before_anything_is_written(tmp_path: Path, bad: float) -> None:
    with actstore.create(tmp_path / "q", fields("int8")) as s:
        v = values(4, 0)
        v["tok"][1] = np.full((2, 3), bad, np.float32)
        with pytest.raises(ValueError, match=r"values\['tok'\].*NaN or infinite.*quantised"):
            s.append(keys(4), v)
        v = values(4, 0)
        v["h"][3, 1] = bad
        with pytest.raises(ValueError, match=r"values\['h'\]: 1 values are NaN or infinite"):
            s.append(keys(4), v, allow_nonfinite=True)  # the policy does not depend on allow_nonfinite
        assert s.pending == 0
        s.append(keys(4), values(4, 0))
        s.commit()
        assert len(s) == 4


def test_field_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantize: expected None or one of"):
        Field((4,), quantize="int4")
    with pytest.raises(ValueError, match="only floating fields"):
        Field((4,), "int64", quantize="int8")
    with pytest.raises(ValueError, match="cannot be combined"):
        Field((4,), quantize="int8", compression="zstd")
    assert Field((4,), "float16", quantize="int8").row_bytes == 4
    assert Field((4,), "float16", quantize="int8") != Field((4,), "float16")
    with pytest.raises(ValueError, match="cannot store"), \
            actstore.create(tmp_path / "b", {"h": Field((2,), quantize="int8")}) as s:
        s.append(keys(1), {"h": np.array([[True, False]])})


def test_hostile_quantize_entries_are_refused(tmp_path: Path) -> None:
    build(tmp_path / "q", "int8")
    root = tmp_path / "q" / "zarr.json"
    good = root.read_bytes()

    def rewrite(change: Any) -> None:
        doc = json.loads(good)
        change(doc["attributes"]["actstore"])
        root.write_bytes(json.dumps(doc).encode())

    rewrite(lambda m: m["fields"]["h"]["quantize"].update(name="int4"))
    with pytest.raises(actstore.UnsupportedFormatError, match="int4"):
        actstore.open(tmp_path / "q")
    rewrite(lambda m: m["fields"]["h"]["quantize"].update(scales="float16"))
    with pytest.raises(CorruptStoreError, match="scales"):
        actstore.open(tmp_path / "q")
    rewrite(lambda m: m.update(version=1))  # version 1 has no quantised fields
    with pytest.raises(CorruptStoreError, match="unknown entries"):
        actstore.open(tmp_path / "q")


# --- other readers and the writers that make such stores ------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_zarr_python_decodes_with_the_documented_formula(tmp_path: Path, scheme: str) -> None:
    zarr = pytest.importorskip("zarr")
    s = build(tmp_path / "q", scheme, (20,))
    seg = f"segments/{s.manifest.segments[0].id}/fields"
    codes = np.asarray(zarr.open_array(store=str(tmp_path / "q"), path=f"{seg}/h/values", mode="r")[...])
    scales = np.asarray(zarr.open_array(store=str(tmp_path / "q"), path=f"{seg}/h/scales", mode="r")[...])
    if scheme == "float8_e4m3":
        q = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    else:
        q = codes.astype(np.float32)
    assert np.array_equal(q * scales[:, None], s.gather(np.arange(20), "h")["h"].numpy())  # type: ignore[union-attr]


def test_precompute_quantize(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    data = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(50)]
    raw = actstore.precompute(model, data, tmp_path / "raw", layers="1", progress=False)
    q = actstore.precompute(model, data, tmp_path / "q", layers="1", quantize="int8", progress=False)
    assert q.fields["1"].quantize == "int8" and raw.fields["1"].quantize is None
    a, b = raw.gather(np.arange(50))["1"], q.gather(np.arange(50))["1"]
    assert torch.equal(b, torch.from_numpy(reference(a.numpy(), "int8")))  # type: ignore[union-attr]
    with pytest.raises(actstore.StoreExistsError, match="quantize"):
        actstore.precompute(model, data, tmp_path / "raw", layers="1", quantize="int8", progress=False)
    again = actstore.precompute(model, data, tmp_path / "q", layers="1", progress=False)  # None keeps the store's
    assert again.fields["1"].quantize == "int8" and len(again) == 50
    with pytest.raises(ValueError, match="quantize"):
        actstore.precompute(model, data, tmp_path / "x", layers="1", quantize="int4", progress=False)


def test_int8_halves_float16_on_disk(tmp_path: Path) -> None:
    """Disk per row at the FAQ store's width: codes plus a 4-byte scale, against float16."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 384)).astype(np.float32)
    sizes = {}
    for name, f in (("f16", Field((384,), "float16")), ("i8", Field((384,), "float16", quantize="int8"))):
        with actstore.create(tmp_path / name, {"h": f}) as s:
            s.append(keys(2000), {"h": x})
            s.commit()
            sizes[name] = s.backend.size()
    assert sizes["i8"] <= 0.52 * sizes["f16"], sizes
