"""Golden tests that pin the on-disk format (docs/FORMAT.md) byte for byte.

The expected bytes here are written out literally or rebuilt from the spec with
independent code (struct, google_crc32c, blake3): a change to what the writer
produces must fail a test here and be a deliberate format change.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import math
import re
import shutil
import struct
import types
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
import torch
from blake3 import blake3

import actstore
import actstore.engine.write.segments
import actstore.store
from actstore import CorruptStoreError, Field, UnsupportedFormatError
from actstore.format.documents import MAX_METADATA_BYTES
from actstore.format.manifest import parse_root

KEYS = [bytes([3]) * 32, bytes([1]) * 32, bytes([2]) * 32]
X = np.arange(6, dtype=np.float32).reshape(3, 2)
T = [[1, 2], [], [3]]

# The zarr.json of field "x" (3 rows of float32[2], chunk_bytes=16 -> 2 rows per inner chunk).
X_ZARR_JSON = b"""{
 "attributes": {},
 "chunk_grid": {
  "configuration": {
   "chunk_shape": [
    4,
    2
   ]
  },
  "name": "regular"
 },
 "chunk_key_encoding": {
  "configuration": {
   "separator": "/"
  },
  "name": "default"
 },
 "codecs": [
  {
   "configuration": {
    "chunk_shape": [
     2,
     2
    ],
    "codecs": [
     {
      "configuration": {
       "endian": "little"
      },
      "name": "bytes"
     }
    ],
    "index_codecs": [
     {
      "configuration": {
       "endian": "little"
      },
      "name": "bytes"
     },
     {
      "name": "crc32c"
     }
    ],
    "index_location": "end"
   },
   "name": "sharding_indexed"
  }
 ],
 "data_type": "float32",
 "fill_value": 0,
 "node_type": "array",
 "shape": [
  3,
  2
 ],
 "zarr_format": 3
}"""

# The shard file of "x": 3 rows + 1 zero row of padding, 2 index entries, CRC32C of the index.
X_SHARD_HEX = (
    "00000000" "0000803f" "00000040" "00004040" "00008040" "0000a040" "00000000" "00000000"
    "0000000000000000" "1000000000000000" "1000000000000000" "1000000000000000"
    "da136a9d"
)

SEGMENT_ID = f"{2:032x}"  # uuid4 calls: 1 create's manifest temp file, 2 the segment, 3 the index run,
RUN_ID = f"{3:032x}"  # 4 the commit's manifest temp file, 5 the view, 6 the second manifest temp file
VIEW_ID = f"{5:032x}"


def write_golden(path: Path, set_view: Any = lambda w: w.set_view("v", [2, 0])) -> Path:
    """Write the golden store deterministically (sequential ids, a fixed creation time); ``set_view`` adds its view."""
    counter = itertools.count(1)

    class FrozenDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> FrozenDatetime:  # type: ignore[override]
            return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(actstore.engine.write.segments.uuid, "uuid4", lambda: uuid.UUID(int=next(counter)))
        mp.setattr(actstore.store.api, "_dt", types.SimpleNamespace(datetime=FrozenDatetime, timezone=datetime.timezone))
        fields = {"x": Field((2,), "float32"), "t": Field((None,), "int16")}
        with actstore.create(path, fields, fingerprint="fp", attrs={"a": 1}, chunk_bytes=16) as w:
            assert w.append(KEYS, {"x": X, "t": T}) == 3
            w.commit()
            set_view(w)
    return path


@pytest.fixture(scope="module")
def golden_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store written deterministically: sequential ids and a fixed creation time."""
    return write_golden(tmp_path_factory.mktemp("golden") / "golden")


@pytest.fixture
def golden(golden_master: Path, tmp_path: Path) -> Path:
    """A private copy of the golden store (tests may damage it)."""
    return Path(shutil.copytree(golden_master, tmp_path / "golden"))


def shard_bytes(data: bytes, rows: int, row_bytes: int, inner_rows: int) -> bytes:
    """A single-shard file built from the Zarr sharding spec, independently of actstore."""
    n_inner = max(1, math.ceil(rows / inner_rows))
    padded = data + bytes(n_inner * inner_rows * row_bytes - len(data))
    index = b"".join(struct.pack("<QQ", i * inner_rows * row_bytes, inner_rows * row_bytes) for i in range(n_inner))
    return padded + index + struct.pack("<I", google_crc32c.value(index))


def load(path: Path) -> Any:
    return json.loads(path.read_bytes())


# --- golden bytes ------------------------------------------------------------------------------


def test_layout_of_a_store(golden: Path) -> None:
    files = sorted(str(p.relative_to(golden)) for p in golden.rglob("*") if p.is_file())
    seg, run, view = f"segments/{SEGMENT_ID}", f"indexes/{RUN_ID}", f"views/{VIEW_ID}"
    assert files == sorted([
        "zarr.json", "lock/zarr.json", "segments/zarr.json", "indexes/zarr.json", "views/zarr.json",
        f"{seg}/zarr.json", f"{seg}/keys/zarr.json", f"{seg}/keys/c/0/0",
        f"{seg}/fields/zarr.json", f"{seg}/fields/x/zarr.json", f"{seg}/fields/x/c/0/0",
        f"{seg}/fields/t/zarr.json", f"{seg}/fields/t/values/zarr.json", f"{seg}/fields/t/values/c/0",
        f"{seg}/fields/t/offsets/zarr.json", f"{seg}/fields/t/offsets/c/0",
        f"{run}/zarr.json", f"{run}/prefix/zarr.json", f"{run}/prefix/c/0", f"{run}/row/zarr.json", f"{run}/row/c/0",
        f"{view}/zarr.json", f"{view}/row/zarr.json", f"{view}/row/c/0",
    ])
    empty_group = b'{\n "attributes": {},\n "node_type": "group",\n "zarr_format": 3\n}'
    for rel in ("segments", "indexes", "views", f"{seg}/fields", f"{seg}/fields/t", "lock"):
        assert (golden / rel / "zarr.json").read_bytes() == empty_group


def test_array_metadata_bytes(golden: Path) -> None:
    assert (golden / "segments" / SEGMENT_ID / "fields/x/zarr.json").read_bytes() == X_ZARR_JSON


def test_shard_file_bytes(golden: Path) -> None:
    seg = golden / "segments" / SEGMENT_ID
    x = (seg / "fields/x/c/0/0").read_bytes()
    assert x == bytes.fromhex(X_SHARD_HEX)
    assert x == shard_bytes(X.astype("<f4").tobytes(), 3, 8, 2)
    assert x[-4:] == struct.pack("<I", google_crc32c.value(x[32:-4]))
    assert (seg / "keys/c/0/0").read_bytes() == shard_bytes(b"".join(KEYS), 3, 32, 1)  # 32-byte rows > 16
    assert (seg / "fields/t/values/c/0").read_bytes() == shard_bytes(struct.pack("<3h", 1, 2, 3), 3, 2, 3)
    assert (seg / "fields/t/offsets/c/0").read_bytes() == shard_bytes(struct.pack("<4q", 0, 2, 2, 3), 4, 8, 2)
    # key index: first 8 key bytes read big-endian, ascending, with global rows
    run = golden / "indexes" / RUN_ID
    prefixes = [int.from_bytes(k[:8], "big") for k in KEYS]
    order = sorted(range(3), key=lambda i: prefixes[i])
    assert order == [1, 2, 0]
    assert (run / "prefix/c/0").read_bytes() == shard_bytes(struct.pack("<3Q", *[prefixes[i] for i in order]), 3, 8, 3)
    assert (run / "row/c/0").read_bytes() == shard_bytes(struct.pack("<3q", *order), 3, 8, 3)
    assert (golden / "views" / VIEW_ID / "row/c/0").read_bytes() == shard_bytes(struct.pack("<2q", 2, 0), 2, 8, 2)


def test_manifest_bytes(golden: Path) -> None:
    root = golden / "zarr.json"
    seg_meta = blake3((golden / "segments" / SEGMENT_ID / "zarr.json").read_bytes()).hexdigest()
    run_meta = blake3((golden / "indexes" / RUN_ID / "zarr.json").read_bytes()).hexdigest()
    view_meta = blake3((golden / "views" / VIEW_ID / "zarr.json").read_bytes()).hexdigest()
    expected = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "actstore": {
                "format": "actstore",
                "version": 1,
                "fields": {"t": {"dtype": "int16", "shape": [None]}, "x": {"dtype": "float32", "shape": [2]}},
                "fingerprint": "fp",
                "attrs": {"a": 1},
                "created": "2026-01-02T03:04:05+00:00",
                "chunk_bytes": 16,
                "generation": 2,
                "rows": 3,
                "segments": [{"id": SEGMENT_ID, "meta": seg_meta, "rows": 3, "values": {"t": 3}}],
                "indexes": [{"id": RUN_ID, "meta": run_meta, "rows": 3}],
                "views": {"v": {"id": VIEW_ID, "meta": view_meta, "rows": 2}},
            }
        },
    }
    assert load(root) == expected
    # serialised as UTF-8 JSON, indent 1, sorted keys
    assert root.read_bytes() == json.dumps(expected, indent=1, sort_keys=True).encode()
    # and the digests themselves are pinned: any change to a segment's metadata shows here
    assert (seg_meta, run_meta, view_meta) == (
        "3c64814bf255c896847b963cc8de16f6bf5d826bded5810dc68fdabc456201b2",
        "23e6badd70159fc5d03f9a76c70b04ce623c1f64ab26ef631566a5b85947c9a3",
        "e3fa6376b46c702268950456a6a8b53b5e50a0e9125ce98b96f34f3eacaa3f79",
    )


def test_object_metadata_records_every_file(golden: Path) -> None:
    for obj, rows, values in (
        (golden / "segments" / SEGMENT_ID, 3, {"t": 3}),
        (golden / "indexes" / RUN_ID, 3, {}),
        (golden / "views" / VIEW_ID, 2, {}),
    ):
        doc = load(obj / "zarr.json")
        assert doc["zarr_format"] == 3 and doc["node_type"] == "group" and set(doc["attributes"]) == {"actstore_segment"}
        attrs = doc["attributes"]["actstore_segment"]
        assert attrs["rows"] == rows and attrs["values"] == values
        on_disk = {str(p.relative_to(obj)) for p in obj.rglob("*") if p.is_file()} - {"zarr.json"}
        assert set(attrs["files"]) == on_disk  # every file but the object's own zarr.json
        for rel, rec in attrs["files"].items():
            data = (obj / rel).read_bytes()
            assert rec == {"size": len(data), "blake3": blake3(data).hexdigest()}


ZARR_NAMES = {
    "float32": ("float32", "<f4"), "float16": ("float16", "<f2"), "bfloat16": ("uint16", "<u2"),
    "int8": ("int8", "i1"), "int16": ("int16", "<i2"), "int32": ("int32", "<i4"), "int64": ("int64", "<i8"),
    "uint8": ("uint8", "u1"), "bool": ("bool", "u1"),
}


@pytest.mark.parametrize("dtype", sorted(ZARR_NAMES))
def test_field_dtype_bytes(tmp_path: Path, dtype: str) -> None:
    """Each dtype: its Zarr data_type, and rows stored as little-endian C-order bytes from offset 0."""
    tdtype = getattr(torch, dtype)
    if tdtype == torch.bool:
        values = torch.tensor([[True, False], [False, False], [True, True]])
    elif tdtype.is_floating_point:
        values = torch.tensor([[1.5, -2.0], [float("nan"), float("-inf")], [0.0, -0.0]]).to(tdtype)
    else:
        values = torch.tensor([[1, -2], [3, 4], [127, 0]]).to(tdtype) if tdtype != torch.uint8 else torch.tensor(
            [[1, 2], [3, 255], [0, 9]], dtype=torch.uint8)
    with actstore.create(tmp_path / "s", {"v": Field((2,), dtype)}) as w:
        w.append(KEYS, {"v": values})
    seg = next((tmp_path / "s" / "segments").glob("*/fields/v"))
    meta = load(seg / "zarr.json")
    zname, storage = ZARR_NAMES[dtype]
    assert meta["data_type"] == zname and meta["fill_value"] == (False if dtype == "bool" else 0)
    raw = values.view(torch.int16).numpy() if tdtype == torch.bfloat16 else values.numpy()
    want = np.ascontiguousarray(raw).astype(storage).tobytes()
    assert (seg / "c/0/0").read_bytes()[: len(want)] == want


def test_empty_array_metadata(tmp_path: Path) -> None:
    """An array of 0 rows (all ragged rows empty) has metadata and no shard file."""
    with actstore.create(tmp_path / "s", {"t": Field((None, 3), "float16")}) as w:
        w.append(KEYS[:1], {"t": [np.zeros((0, 3))]})
    values = next((tmp_path / "s" / "segments").glob("*/fields/t/values"))
    meta = load(values / "zarr.json")
    assert meta["shape"] == [0, 3] and meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 3]
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, 3]
    assert not (values / "c").exists()


def test_lock_document(tmp_path: Path) -> None:
    w = actstore.create(tmp_path / "s", {"x": Field(2)})
    held = load(tmp_path / "s" / "lock/zarr.json")
    assert held["zarr_format"] == 3 and held["node_type"] == "group"
    assert set(held["attributes"]["writer"]) == {"pid", "host", "since"}
    w.close()
    assert load(tmp_path / "s" / "lock/zarr.json")["attributes"] == {}


# --- versions and validation -----------------------------------------------------------------


def _rewrite(path: Path, edit: Any) -> None:
    doc = load(path / "zarr.json")
    edit(doc["attributes"]["actstore"])
    (path / "zarr.json").write_text(json.dumps(doc))


def test_other_versions_are_refused(golden: Path) -> None:
    _rewrite(golden, lambda m: m.update(version=4))
    for call in (lambda: actstore.open(golden), lambda: actstore.open(golden, mode="a")):
        with pytest.raises(UnsupportedFormatError,
                           match=re.compile(r"unsupported format version: got 4\. expected 1, 2 or 3", re.I)):
            call()
    # version 3 is the version of stores with a view that has columns, or whose rows were renumbered; this store has
    # neither
    _rewrite(golden, lambda m: m.update(version=3))
    with pytest.raises(CorruptStoreError, match="no view has columns and no rows were renumbered"):
        actstore.open(golden)
    _rewrite(golden, lambda m: m.update(version=1, renumbered=1))
    with pytest.raises(CorruptStoreError, match="renumbered"):
        actstore.open(golden)
    _rewrite(golden, lambda m: m.update(version=3, renumbered=2))
    with actstore.open(golden) as store:
        assert store.manifest.renumbered == 2 and store.manifest.version == 3
    _rewrite(golden, lambda m: m.pop("renumbered"))
    # version 2 is the version of stores with a quantised field; this store has none
    _rewrite(golden, lambda m: m.update(version=2))
    with pytest.raises(CorruptStoreError, match="no field is quantised"):
        actstore.open(golden)
    for almost in (1.0, True, "1"):
        _rewrite(golden, lambda m, v=almost: m.update(version=v))
        with pytest.raises(UnsupportedFormatError, match="unsupported format version"):
            actstore.open(golden)
    _rewrite(golden, lambda m: m.update(version=1, format="other"))
    with pytest.raises(UnsupportedFormatError, match="unsupported format 'other'"):
        actstore.open(golden)
    _rewrite(golden, lambda m: m.update(format="actstore"))
    assert len(actstore.open(golden)) == 3


def _valid_root(golden: Path) -> dict[str, Any]:
    doc: dict[str, Any] = load(golden / "zarr.json")
    return doc


MUTATIONS: list[tuple[str, Any]] = [
    ("zarr_format 2", lambda d: d.update(zarr_format=2)),
    ("an array", lambda d: d.update(node_type="array")),
    ("attributes a list", lambda d: d.update(attributes=[])),
    ("no manifest", lambda d: d["attributes"].pop("actstore")),
    ("manifest a list", lambda d: d["attributes"].update(actstore=[])),
    ("fields a list", lambda d: d["attributes"]["actstore"].update(fields=[])),
    ("no fields", lambda d: d["attributes"]["actstore"].update(fields={})),
    ("field name with a slash", lambda d: d["attributes"]["actstore"]["fields"].update({"a/b": {"shape": [1], "dtype": "int8"}})),
    ("field name zarr.json", lambda d: d["attributes"]["actstore"]["fields"].update({"zarr.json": {"shape": [1], "dtype": "int8"}})),
    ("field dtype float64", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(dtype="float64")),
    ("field dtype an int", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(dtype=3)),
    ("field dtype a numpy comma string", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(dtype=",loat32")),
    ("field dtype a numpy code", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(dtype="<f4")),
    ("field compression a string", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(compression="zstd")),
    ("field compression level a bool", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(
        compression={"name": "zstd", "level": True})),
    ("field compression level too high", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(
        compression={"name": "zstd", "level": 23})),
    ("field compression extra key", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(
        compression={"name": "zstd", "level": 3, "dict": "x"})),
    ("field shape a string", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(shape="2")),
    ("field shape 9 dims", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(shape=[1] * 9)),
    ("field shape zero", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(shape=[0])),
    ("field shape float", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(shape=[2.0])),
    ("field shape too big", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(shape=[2**41])),
    ("field extra key", lambda d: d["attributes"]["actstore"]["fields"]["x"].update(extra=1)),
    ("fingerprint an int", lambda d: d["attributes"]["actstore"].update(fingerprint=5)),
    ("attrs a list", lambda d: d["attributes"]["actstore"].update(attrs=[])),
    ("created an int", lambda d: d["attributes"]["actstore"].update(created=5)),
    ("chunk_bytes zero", lambda d: d["attributes"]["actstore"].update(chunk_bytes=0)),
    ("chunk_bytes a string", lambda d: d["attributes"]["actstore"].update(chunk_bytes="16")),
    ("generation negative", lambda d: d["attributes"]["actstore"].update(generation=-1)),
    ("generation a bool", lambda d: d["attributes"]["actstore"].update(generation=True)),
    ("generation too big", lambda d: d["attributes"]["actstore"].update(generation=2**53 + 1)),
    ("rows disagree", lambda d: d["attributes"]["actstore"].update(rows=4)),
    ("rows a float", lambda d: d["attributes"]["actstore"].update(rows=3.0)),
    ("segments a dict", lambda d: d["attributes"]["actstore"].update(segments={})),
    ("segment id upper", lambda d: d["attributes"]["actstore"]["segments"][0].update(id="A" * 32)),
    ("segment id a path", lambda d: d["attributes"]["actstore"]["segments"][0].update(id="../" + "0" * 29)),
    ("segment id short", lambda d: d["attributes"]["actstore"]["segments"][0].update(id="0" * 31)),
    ("segment rows zero", lambda d: d["attributes"]["actstore"]["segments"][0].update(rows=0)),
    ("segment meta short", lambda d: d["attributes"]["actstore"]["segments"][0].update(meta="0" * 63)),
    ("segment extra key", lambda d: d["attributes"]["actstore"]["segments"][0].update(path="/etc")),
    ("segment values missing", lambda d: d["attributes"]["actstore"]["segments"][0].update(values={})),
    ("segment values negative", lambda d: d["attributes"]["actstore"]["segments"][0].update(values={"t": -1})),
    ("indexes a dict", lambda d: d["attributes"]["actstore"].update(indexes={})),
    ("index rows disagree", lambda d: d["attributes"]["actstore"]["indexes"][0].update(rows=2)),
    ("index id shared", lambda d: d["attributes"]["actstore"]["indexes"][0].update(id=d["attributes"]["actstore"]["segments"][0]["id"])),
    ("views a list", lambda d: d["attributes"]["actstore"].update(views=[])),
    ("view name invalid", lambda d: d["attributes"]["actstore"]["views"].update({"../v": d["attributes"]["actstore"]["views"]["v"]})),
    ("view rows negative", lambda d: d["attributes"]["actstore"]["views"]["v"].update(rows=-1)),
]


@pytest.mark.parametrize("mutate", [m[1] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_parse_root_refuses_malformed_manifests(golden_master: Path, tmp_path: Path, mutate: Any) -> None:
    doc = copy.deepcopy(_valid_root(golden_master))
    parse_root(json.dumps(doc).encode(), "zarr.json")  # the unmutated document is fine
    mutate(doc)
    with pytest.raises(CorruptStoreError):
        parse_root(json.dumps(doc).encode(), "zarr.json")
    (tmp_path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError):
        actstore.open(tmp_path)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b"\xff\xfe", b'{"zarr_format": NaN}', b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "text", "list", "not utf-8", "NaN", "Infinity", "deep"],
)
def test_parse_root_refuses_non_documents(data: bytes) -> None:
    with pytest.raises(CorruptStoreError):
        parse_root(data, "zarr.json")


def test_parse_root_size_limit() -> None:
    with pytest.raises(CorruptStoreError, match="limit"):
        parse_root(b" " * (MAX_METADATA_BYTES + 1), "zarr.json")


def test_manifest_round_trips(golden: Path) -> None:
    data = (golden / "zarr.json").read_bytes()
    manifest = parse_root(data, "zarr.json")
    assert actstore.format.manifest.root_document(manifest) == data
    assert manifest.rows == 3 and manifest.fields["t"].ragged and manifest.generation == 2


# --- §6: equal key prefixes keep their input order ---------------------------------------------


def test_index_run_sorts_equal_prefixes_stably(tmp_path: Path) -> None:
    # Keys that share their first 8 bytes (zero-padded ids, say), around keys of other prefixes: the run lists
    # the shared-prefix keys in row order (numpy's default, unstable sort scrambles them).
    shared = [bytes(8) + i.to_bytes(24, "big") for i in range(20)]
    keys = shared[:10] + [bytes([9]) * 32, bytes([3]) * 32, bytes(7) + b"\x05" + bytes(24)] + shared[10:]
    with actstore.create(tmp_path / "s", {"x": Field((), "int64")}) as w:
        w.append(keys, {"x": np.arange(len(keys))})
        w.commit()
    s = actstore.open(tmp_path / "s")
    run_id = s.manifest.indexes[0].id
    rows = np.frombuffer((tmp_path / "s" / "indexes" / run_id / "row/c/0").read_bytes()[: 8 * len(keys)], "<i8")
    assert rows.tolist() == [*range(10), *range(13, 23), 12, 11, 10]
    assert s.lookup(keys).tolist() == list(range(len(keys)))


# --- §14: the precompute record ----------------------------------------------------------------

from actstore.format.record import (  # noqa: E402
    ItemRecord,
    LayerRecord,
    PrecomputeRecord,
    SideRecord,
)

# What precompute writes for a list of (text, label) tuples captured at one token-level layer.
RECORD_JSON = (
    '{"version": 2, "layers": [{"layer": "encoder.layer.2", "field": "encoder.layer.2", "ragged": true}], '
    '"sample": {"type": "tuple", "length": 2, "input": 0, "side": [{"name": "1", "field": "item_1", '
    '"kind": "int"}], "dropped": []}, "view": "dataset", "dataset_length": 10, "dataset_class": "builtins.list", '
    '"model_class": "m.M", "store_dtype": "float16", "key_fn": "actstore.key", "collate_fn": "c.f", '
    '"keys": "inputs", "lengths_fn": null}'
)
# What earlier versions wrote (version 1: rows keyed by the raw items).
RECORD_JSON_V1 = (
    '{"version": 1, "layers": [{"layer": "encoder.layer.2", "field": "encoder.layer.2", "ragged": true}], '
    '"sample": {"type": "tuple", "length": 2, "input": 0, "side": [{"name": "1", "field": "item_1", '
    '"kind": "int"}], "dropped": []}, "view": "dataset", "dataset_length": 10, "dataset_class": "builtins.list", '
    '"model_class": "m.M", "store_dtype": "float16", "key_fn": "actstore.key", "collate_fn": "c.f"}'
)


def test_precompute_record_golden() -> None:
    rec = PrecomputeRecord(
        layers=(LayerRecord("encoder.layer.2", "encoder.layer.2", True),),
        item=ItemRecord("tuple", 0, 2, None, (SideRecord("1", "item_1", "int"),), ()),
        dataset_length=10, dataset_class="builtins.list", model_class="m.M", store_dtype="float16", collate_fn="c.f",
    )
    assert json.dumps(rec.to_json()) == RECORD_JSON
    assert PrecomputeRecord.from_json(json.loads(RECORD_JSON)) == rec
    # version 1 is still read: its rows are keyed by the raw items, and it writes back as it was
    v1 = PrecomputeRecord.from_json(json.loads(RECORD_JSON_V1))
    assert v1 == dataclasses.replace(rec, version=1, keys="items")
    assert json.dumps(v1.to_json()) == RECORD_JSON_V1
    items = dataclasses.replace(rec, keys="items", key_fn="m.my_key", lengths_fn="m.lengths")
    assert PrecomputeRecord.from_json(items.to_json()) == items
    assert rec.side_fields == {1: "item_1"} and rec.layer_fields == ("encoder.layer.2",)
    d = {"version": 1, "layers": [], "sample": {"type": "dict", "keys": ["text", "y"], "input": "text",
                                                 "side": [{"name": "y", "field": "y", "kind": "str"}], "dropped": []}}
    assert PrecomputeRecord.from_json(d).side_fields == {"y": "y"}
    placeholder = PrecomputeRecord(item=None, placeholder=True)
    assert PrecomputeRecord.from_json(placeholder.to_json()) == placeholder
    autocast = dataclasses.replace(rec, autocast="bfloat16")  # the key is written only by a run under autocast
    assert autocast.to_json()["autocast"] == "bfloat16" and "autocast" not in rec.to_json()
    assert PrecomputeRecord.from_json(autocast.to_json()) == autocast
    assert placeholder.to_json()["sample"] is None and placeholder.to_json()["placeholder"] is True
    # a record that omits what readers may default (as older writers and tests write it)
    assert PrecomputeRecord.from_json({"version": 1, "layers": []}).item == ItemRecord()


def test_precompute_record_other_versions_are_unsupported() -> None:
    doc = json.loads(RECORD_JSON)
    doc["version"] = 4
    with pytest.raises(UnsupportedFormatError, match=r"Unsupported precompute record version: got 4\. Expected 2"):
        PrecomputeRecord.from_json(doc)
    for bad in ("1", None, True, 1.0):
        doc["version"] = bad
        with pytest.raises(CorruptStoreError, match=r"attrs\.precompute\.version"):
            PrecomputeRecord.from_json(doc)


def test_precompute_record_version_3_holds_the_stored_augmentations() -> None:
    doc = json.loads(RECORD_JSON)
    doc.update(version=3, augment="m.word_dropout", augmentations=4)
    rec = PrecomputeRecord.from_json(doc)
    assert (rec.augment, rec.augmentations) == ("m.word_dropout", 4)
    assert rec.to_json() == doc
    for bad in (1, 0, "4", None):  # a version-3 record stores two or more augmentations per item
        with pytest.raises(CorruptStoreError, match=r"attrs\.precompute\.augmentations"):
            PrecomputeRecord.from_json({**doc, "augmentations": bad})
    with pytest.raises(CorruptStoreError, match=r"attrs\.precompute: unknown keys \['augment', 'augmentations'\]"):
        PrecomputeRecord.from_json({**doc, "version": 2})


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda d: d.update(layers={}), r"attrs\.precompute\.layers: expected a JSON array"),
    (lambda d: d["layers"][0].update(field=3), r"attrs\.precompute\.layers\[0\]\.field"),
    (lambda d: d["layers"][0].update(ragged="yes"), r"attrs\.precompute\.layers\[0\]\.ragged"),
    (lambda d: d["layers"][0].update(extra=1), r"attrs\.precompute\.layers\[0\]: unknown keys \['extra'\]"),
    (lambda d: d.update(surprise=1), r"attrs\.precompute: unknown keys \['surprise'\]"),
    (lambda d: d["sample"].update(type="list"), r"attrs\.precompute\.sample\.type"),
    (lambda d: d["sample"].update(input=2), r"attrs\.precompute\.sample\.input: position 2"),
    (lambda d: d["sample"]["side"][0].update(kind="pickle"), r"attrs\.precompute\.sample\.side\[0\]\.kind"),
    (lambda d: d["sample"]["side"][0].update(name="x"), r"attrs\.precompute\.sample\.side\[0\]\.name"),
    (lambda d: d.update(dataset_length=-1), r"attrs\.precompute\.dataset_length"),
    (lambda d: d.update(view=""), r"attrs\.precompute\.view"),
    (lambda d: d.update(keys="raw"), r"attrs\.precompute\.keys: expected one of \['inputs', 'items'\]"),
    (lambda d: d.pop("keys"), r"attrs\.precompute\.keys: expected one of"),
    (lambda d: d.update(lengths_fn=3), r"attrs\.precompute\.lengths_fn"),
    (lambda d: d.update(version=1), r"attrs\.precompute: unknown keys \['keys', 'lengths_fn'\]"),
    (lambda d: d.update(autocast="float64"), r"attrs\.precompute\.autocast: expected one of \['float16', 'bfloat16'\]"),
], ids=["layers", "field", "ragged", "layer key", "top key", "type", "input", "kind", "tuple name", "length", "view",
        "keys", "no keys", "lengths_fn", "v1 with v2 keys", "autocast"])
def test_precompute_record_malformed(mutate: Any, where: str) -> None:
    doc = json.loads(RECORD_JSON)
    mutate(doc)
    with pytest.raises(CorruptStoreError, match=where):
        PrecomputeRecord.from_json(doc)


def test_precompute_record_as_written_by_precompute(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    data = [(torch.ones(2) * i, i % 2) for i in range(4)]
    store = actstore.precompute(model, data, tmp_path / "s", layers="0", progress=False)
    rec = PrecomputeRecord.from_json(store.attrs["precompute"])
    assert rec.to_json() == store.attrs["precompute"]
    assert rec.item == ItemRecord("tuple", 0, 2, None, (SideRecord("1", "item_1", "int"),), ())
    assert rec.layers == (LayerRecord("0", "0", False),) and rec.dataset_length == 4
