"""Format version 3: views with columns per position (FORMAT.md §1, §2, §8) — golden bytes, strict parsing, verify."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blake3 import blake3

import actstore
import actstore.engine.write.segments
import actstore.store
from actstore import CorruptStoreError, Field
from actstore.format.manifest import parse_root
from actstore.store import clone_store
from tests.test_format import KEYS, SEGMENT_ID, load, shard_bytes, write_golden

VIEW_ID = f"{5:032x}"  # uuid4 calls as in test_format's golden store: the view object is the fifth


@pytest.fixture(scope="module")
def golden3_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_format's golden store, its view with a fixed column, a str column and the positions' input keys."""
    return write_golden(tmp_path_factory.mktemp("golden3") / "golden", lambda w: w.set_view(
        "v", [2, 0], {"label": np.array([7, -1]), "name": [np.frombuffer(bytearray(b"ab"), np.uint8), []]},
        fields={"name": Field((None,), "uint8")}, item_key=[KEYS[2], KEYS[0]]))


@pytest.fixture
def golden3(golden3_master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(golden3_master, tmp_path / "golden"))


def test_layout_of_a_view_with_columns(golden3: Path) -> None:
    view = golden3 / "views" / VIEW_ID
    files = sorted(str(p.relative_to(view)) for p in view.rglob("*") if p.is_file())
    assert files == sorted([
        "zarr.json", "row/zarr.json", "row/c/0", "item_key/zarr.json", "item_key/c/0/0",
        "fields/zarr.json", "fields/label/zarr.json", "fields/label/c/0",
        "fields/name/zarr.json", "fields/name/values/zarr.json", "fields/name/values/c/0",
        "fields/name/offsets/zarr.json", "fields/name/offsets/c/0",
    ])
    doc = load(view / "zarr.json")["attributes"]["actstore_segment"]
    assert doc["rows"] == 2 and doc["values"] == {"name": 2} and set(doc["files"]) == set(files) - {"zarr.json"}


def test_view_column_bytes(golden3: Path) -> None:
    view = golden3 / "views" / VIEW_ID
    assert (view / "row/c/0").read_bytes() == shard_bytes(struct.pack("<2q", 2, 0), 2, 8, 2)
    assert (view / "item_key/c/0/0").read_bytes() == shard_bytes(KEYS[2] + KEYS[0], 2, 32, 2)
    assert (view / "fields/label/c/0").read_bytes() == shard_bytes(struct.pack("<2q", 7, -1), 2, 8, 2)
    assert (view / "fields/name/values/c/0").read_bytes() == shard_bytes(b"ab", 2, 1, 2)
    assert (view / "fields/name/offsets/c/0").read_bytes() == shard_bytes(struct.pack("<3q", 0, 2, 2), 3, 8, 3)


def test_manifest_bytes_version_3(golden3: Path) -> None:
    root = load(golden3 / "zarr.json")["attributes"]["actstore"]
    view_meta = blake3((golden3 / "views" / VIEW_ID / "zarr.json").read_bytes()).hexdigest()
    assert root["version"] == 3
    assert root["views"] == {"v": {
        "id": VIEW_ID, "meta": view_meta, "rows": 2,
        "columns": {"label": {"dtype": "int64", "shape": []}, "name": {"dtype": "uint8", "shape": [None]}},
        "values": {"name": 2}, "item_key": True}}
    assert root["segments"][0]["id"] == SEGMENT_ID
    assert view_meta == "92660e99bcbe1e674fb596f71dce852d42b678b5a60834178eef04e58e7d527b"


def test_view_columns_read_back(golden3: Path) -> None:
    s = actstore.open(golden3)
    cols = s.view_columns("v")
    assert cols is not None and cols.rows == 2 and list(cols.fields) == ["label", "name"]
    assert cols["label"].tolist() == [7, -1]
    name = cols["name"]
    assert name.offsets.tolist() == [0, 2, 2] and bytes(name.values.numpy()) == b"ab"
    assert cols.item_key is not None and cols.item_key.tobytes() == KEYS[2] + KEYS[0]
    assert s.view("v").tolist() == [2, 0]
    s.verify()


def _rewrite(path: Path, edit: Any) -> None:
    doc = load(path / "zarr.json")
    edit(doc["attributes"]["actstore"])
    (path / "zarr.json").write_text(json.dumps(doc))


def test_versions_and_view_columns_agree(golden3: Path) -> None:
    for older in (1, 2):  # a version 1 or 2 manifest cannot have view columns
        _rewrite(golden3, lambda m, v=older: m.update(version=v))
        with pytest.raises(CorruptStoreError, match="unknown entries|no field is quantised"):
            actstore.open(golden3)
        with pytest.raises(CorruptStoreError, match="unknown entries"):
            parse_root(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"actstore": {
                **load(golden3 / "zarr.json")["attributes"]["actstore"], "version": 1}}}).encode(), "zarr.json")
    _rewrite(golden3, lambda m: m.update(version=3))
    assert actstore.open(golden3).manifest.version == 3


def _view(d: dict[str, Any]) -> dict[str, Any]:
    return d["attributes"]["actstore"]["views"]["v"]  # type: ignore[no-any-return]


VIEW_MUTATIONS: list[tuple[str, Any]] = [
    ("columns a list", lambda d: _view(d).update(columns=[])),
    ("columns missing", lambda d: _view(d).pop("columns")),
    ("values missing", lambda d: _view(d).pop("values")),
    ("item_key missing", lambda d: _view(d).pop("item_key")),
    ("item_key an int", lambda d: _view(d).update(item_key=1)),
    ("item_key a string", lambda d: _view(d).update(item_key="true")),
    ("an unknown entry", lambda d: _view(d).update(path="/etc")),
    ("a column name with a slash", lambda d: _view(d)["columns"].update({"a/b": {"shape": [], "dtype": "int8"}})),
    ("a column dtype float64", lambda d: _view(d)["columns"]["label"].update(dtype="float64")),
    ("a compressed column", lambda d: _view(d)["columns"]["label"].update(compression={"name": "zstd", "level": 3})),
    ("a quantised column", lambda d: _view(d)["columns"]["label"].update(dtype="float32",
                                                                         quantize={"name": "int8", "scales": "float32"})),
    ("ragged counts missing", lambda d: _view(d).update(values={})),
    ("counts of a fixed column", lambda d: _view(d)["values"].update(label=2)),
    ("a negative count", lambda d: _view(d)["values"].update(name=-1)),
    ("no column and no key", lambda d: _view(d).update(columns={}, values={}, item_key=False)),
    ("version 3 without columns", lambda d: [_view(d).pop(k) for k in ("columns", "values", "item_key")]),
]


@pytest.mark.parametrize("mutate", [m[1] for m in VIEW_MUTATIONS], ids=[m[0] for m in VIEW_MUTATIONS])
def test_parse_root_refuses_malformed_view_entries(golden3_master: Path, mutate: Any) -> None:
    doc = load(golden3_master / "zarr.json")
    parse_root(json.dumps(doc).encode(), "zarr.json")  # the unmutated document is fine
    doc = copy.deepcopy(doc)
    mutate(doc)
    with pytest.raises(CorruptStoreError):
        parse_root(json.dumps(doc).encode(), "zarr.json")


@pytest.mark.parametrize("rel", ["fields/label/c/0", "fields/name/values/c/0", "fields/name/offsets/c/0",
                                 "item_key/c/0/0"])
def test_verify_finds_a_flipped_byte_in_a_view_column(golden3: Path, rel: str) -> None:
    path = golden3 / "views" / VIEW_ID / rel
    data = bytearray(path.read_bytes())
    data[1] ^= 0x40
    path.write_bytes(bytes(data))
    # (damaged offsets are refused when the view is mapped, at open; other bytes by their checksum)
    with pytest.raises(CorruptStoreError, match=rel.replace("/", ".") + "|offsets: offsets are not"):
        actstore.open(golden3).verify()


def test_verify_finds_bad_offsets_in_a_view_column(golden3: Path) -> None:
    """Offsets rewritten with a matching checksum (a writer bug, not damage) are still refused."""
    view = golden3 / "views" / VIEW_ID
    off = view / "fields/name/offsets/c/0"
    off.write_bytes(shard_bytes(struct.pack("<3q", 0, 3, 2), 3, 8, 3))
    doc = load(view / "zarr.json")
    rec = doc["attributes"]["actstore_segment"]["files"]["fields/name/offsets/c/0"]
    rec["blake3"] = blake3(off.read_bytes()).hexdigest()
    (view / "zarr.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    _rewrite(golden3, lambda m: m["views"]["v"].update(meta=blake3((view / "zarr.json").read_bytes()).hexdigest()))
    with pytest.raises(CorruptStoreError, match="offsets"):
        actstore.open(golden3)


def test_clone_and_carry_views_keep_the_columns(golden3: Path, tmp_path: Path) -> None:
    clone_store(str(golden3), str(tmp_path / "c"))
    assert actstore.open(tmp_path / "c").view_columns("v")["label"].tolist() == [7, -1]
    src = actstore.open(golden3)
    with actstore.create(tmp_path / "d", dict(src.fields)) as dst:
        dst.append(src.key_at([2, 1, 0]), {"x": src.gather([2, 1, 0])["x"], "t": [src[r]["t"] for r in (2, 1, 0)]})
        dst.commit()
        dst.carry_views(src)
    d = actstore.open(tmp_path / "d")
    cols = d.view_columns("v")
    assert d.view("v").tolist() == [0, 2] and cols["label"].tolist() == [7, -1]
    assert cols["name"].offsets.tolist() == [0, 2, 2] and cols.item_key.tobytes() == KEYS[2] + KEYS[0]
    d.verify()


def test_a_quantised_store_with_view_columns_is_version_3(tmp_path: Path) -> None:
    with actstore.create(tmp_path / "q", {"h": Field((4,), "float32", quantize="int8")}) as w:
        w.append([actstore.key(i) for i in range(2)], {"h": torch.randn(2, 4)})
        w.commit()
        w.set_view("dataset", [1, 0])
    assert actstore.open(tmp_path / "q").manifest.version == 2
    with actstore.open(tmp_path / "q", mode="a") as w:
        w.set_view("dataset", [1, 0], {"y": np.array([0.5, 1.5], np.float32)})
    s = actstore.open(tmp_path / "q")
    assert s.manifest.version == 3 and s.view_columns("dataset")["y"].tolist() == [0.5, 1.5]
    assert s.view_columns("dataset").item_key is None
    s.verify()


def test_set_view_refuses_bad_columns(tmp_path: Path) -> None:
    with actstore.create(tmp_path / "s", {"h": Field((2,), "float32")}) as w:
        w.append([actstore.key(0)], {"h": torch.zeros(1, 2)})
        w.commit()
        with pytest.raises(ValueError, match="1 keys for|rows for|batch shape"):
            w.set_view("v", [0], {"y": np.arange(2)})
        with pytest.raises(TypeError, match="fields="):
            w.set_view("v", [0], {"y": [np.arange(2)]})
        with pytest.raises(ValueError, match="stored raw"):
            w.set_view("v", [0], {"y": np.ones(1, np.float32)}, fields={"y": Field((), "float32", quantize="int8")})
        with pytest.raises(ValueError, match="name"):
            w.set_view("v", [0], {"a/b": np.arange(1)})
