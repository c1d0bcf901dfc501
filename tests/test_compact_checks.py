"""Compaction and adopt copy only verified bytes: a damaged source file is refused, never laundered."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore import Field, TieredMerge
from actstore.cli import main as cli_main
from actstore.errors import CorruptStoreError

FIELDS = {
    "h": Field((4,), "float16"),
    "tok": Field((None, 3), "float32"),
    "label": Field((), "int64"),
    "q": Field((None, 8), "float32", quantize="int8"),
    "z": Field((6,), "float32", compression="zstd"),
}


def batch(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
    rngs = [np.random.default_rng(i) for i in range(lo, hi)]
    ids = range(lo, hi)
    return [actstore.key(i) for i in ids], {
        "h": np.array([g.standard_normal(4) for g in rngs], np.float16).reshape(-1, 4),
        "tok": [g.standard_normal((1 + i % 4, 3)).astype(np.float32) for g, i in zip(rngs, ids, strict=True)],
        "label": np.arange(lo, hi) * 7,
        "q": [g.standard_normal((1 + i % 3, 8)).astype(np.float32) for g, i in zip(rngs, ids, strict=True)],
        "z": np.array([g.standard_normal(6) for g in rngs], np.float32).reshape(-1, 6),
    }


def make(path: Path, sizes: list[int], fields: dict[str, Field] | None = None,
         policy: TieredMerge | None = None) -> actstore.ActivationStore:
    s = actstore.create(path, fields or FIELDS, fingerprint="m")
    s.merge_policy = policy
    lo = 0
    for n in sizes:
        keys, values = batch(lo, lo + n)
        s.append(keys, {k: v for k, v in values.items() if k in s.fields})
        s.commit()
        lo += n
    return s


#: Files of a segment (relative to it) that a compaction reads: data of every kind, offsets, scales, metadata.
FILES = ["keys/c/0/0", "fields/h/c/0/0", "fields/label/c/0", "fields/tok/values/c/0/0", "fields/tok/offsets/c/0",
         "fields/q/values/c/0/0", "fields/q/scales/c/0", "fields/z/c/0/0", "fields/h/zarr.json", "fields/zarr.json"]


def damage(path: Path, rel: str, segment: int = 1) -> str:
    """Change 4 bytes of one file of the store's ``segment``-th segment (size kept); returns the segment id."""
    seg = actstore.open(path).manifest.segments[segment].id
    f = path / "segments" / seg / rel
    data = bytearray(f.read_bytes())
    at = min(3, len(data) - 4)
    if f.name == "zarr.json":
        at = data.index(b"{") + 1  # inside the document: still a file of the same size, other bytes
        data[at : at + 4] = b"    "
    else:
        data[at : at + 4] = bytes(255 - x for x in data[at : at + 4])
    f.write_bytes(bytes(data))
    return seg


def listed(path: Path) -> set[str]:
    return set(os.listdir(path / "segments")) - {"zarr.json"}


@pytest.mark.parametrize("drop", [None, [0]], ids=["merge", "reclaim"])  # reclaim: a compaction dropping rows
@pytest.mark.parametrize("rel", FILES)
def test_compact_refuses_a_damaged_source_and_leaves_the_store(tmp_path: Path, rel: str, drop: Any) -> None:
    path = tmp_path / "s"
    make(path, [3, 4, 5]).close()
    seg = damage(path, rel)
    before = listed(path)
    with actstore.open(path, mode="a") as w:
        gen = w.generation
        with pytest.raises(CorruptStoreError) as e:
            w.compact(drop=drop)
        assert seg in str(e.value) and rel in str(e.value), str(e.value)  # names the segment and the file
        assert w.generation == gen and len(w.manifest.segments) == 3 and w.manifest.renumbered == 0
    assert listed(path) == before  # the damaged segment kept, the partial output deleted
    with pytest.raises(CorruptStoreError, match=seg):
        actstore.open(path).verify()  # still reported


def test_cli_compact_refuses_damage_and_verify_still_reports_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    make(path, [3, 4, 5], {"h": FIELDS["h"]}).close()
    seg = damage(path, "fields/h/c/0/0")
    assert cli_main(["verify", str(path)]) == 1
    assert cli_main(["compact", str(path)]) != 0
    assert seg in capsys.readouterr().err
    assert cli_main(["verify", str(path)]) == 1
    assert len(actstore.open(path).manifest.segments) == 3


def test_a_damaged_segment_never_fails_the_commit_that_triggers_an_automatic_merge(tmp_path: Path) -> None:
    path = tmp_path / "s"
    s = make(path, [2, 2, 2], policy=TieredMerge(fanout=4))
    seg = damage(path, "fields/h/c/0/0", segment=0)
    keys, values = batch(6, 8)
    s.append(keys, values)
    with pytest.warns(RuntimeWarning, match=seg):
        gen = s.commit()
    assert s.generation == gen and len(s.manifest.segments) == 4 and len(s) == 8  # committed, nothing merged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged range is not merged (nor warned about) again
        s.append(*batch(8, 9))
        s.commit()
    assert len(s) == 9
    s.close()
    with pytest.raises(CorruptStoreError, match=seg):
        actstore.open(path).verify()


def test_adopt_refuses_a_damaged_part_of_the_right_size(tmp_path: Path) -> None:
    main = make(tmp_path / "main", [4])
    part = actstore.create(tmp_path / "part2", FIELDS, fingerprint="m")  # new rows only: linked whole
    keys, values = batch(4, 9)
    part.append(keys, values)
    part.commit()
    part.close()
    seg = damage(tmp_path / "part2", "fields/h/c/0/0", segment=0)
    gen = main.generation
    with pytest.raises(CorruptStoreError, match=seg):
        main.adopt(tmp_path / "part2")
    assert main.generation == gen and len(main) == 4


def test_adopt_checks_segments_whose_new_rows_it_copies(tmp_path: Path) -> None:
    main = make(tmp_path / "main", [4])
    part = actstore.create(tmp_path / "part", FIELDS, fingerprint="m")
    keys, values = batch(2, 9)  # rows 2, 3 are in main already: the new ones are copied, not linked
    part.append(keys, values)
    part.commit()
    part.close()
    seg = damage(tmp_path / "part", "fields/tok/values/c/0/0", segment=0)
    with pytest.raises(CorruptStoreError, match=seg):
        main.adopt(tmp_path / "part")
    assert len(main) == 4 and main.pending == 0


def test_precompute_keeps_every_row_when_its_final_compaction_finds_damage(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from actstore.precompute import run as run_mod

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    data = [torch.full((4,), float(i)) for i in range(40)]
    real = run_mod.Run._compact
    damaged: list[str] = []

    def damage_then_compact(self: Any, *args: Any) -> None:
        damaged.append(damage(Path(self.root), "keys/c/0/0", segment=0))
        real(self, *args)

    monkeypatch.setattr(run_mod.Run, "_compact", damage_then_compact)
    with pytest.warns(RuntimeWarning, match="every row is committed"):
        actstore.precompute(model, data, tmp_path / "p", layers=["0"], batch_size=8, commit_every_rows=8,
                            progress=False)
    s = actstore.open(tmp_path / "p")
    assert len(s) == 40 and len(s.manifest.segments) > 1
    with pytest.raises(CorruptStoreError, match=damaged[0]):
        s.verify()


def test_adopt_copies_the_new_rows_of_a_part_as_stored(tmp_path: Path) -> None:
    fields = {"h": FIELDS["h"], "tok": FIELDS["tok"], "q16": Field((None, 8), "float16", quantize="int8")}

    def rows(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
        keys, values = batch(lo, hi)
        return keys, {"h": values["h"], "tok": values["tok"], "q16": [q * 40 for q in values["q"]]}

    main = actstore.create(tmp_path / "main", fields, fingerprint="m")
    main.append(*rows(0, 4))
    main.commit()
    part = actstore.create(tmp_path / "part", fields, fingerprint="m")
    keys, values = rows(2, 40)  # rows 2, 3 are in main already: the new ones are copied, not linked
    part.append(keys, values)
    part.commit()
    assert main.adopt(part) == 36
    new = keys[2:]
    for name in fields:
        a, b = main.gather(main.lookup(new), [name])[name], part.gather(part.lookup(new), [name])[name]
        x, y = (a, b) if isinstance(a, torch.Tensor) else (a.values, b.values)
        assert torch.equal(x.view(torch.int16), y.view(torch.int16)), name  # bit for bit
    seg_main, seg_part = main.snapshot.segments[-1], part.snapshot.segments[0]
    first = int(seg_part.ragged("q16")[1][2])  # the part's elements of its rows 2.. (the new ones)
    assert np.array_equal(seg_main.scales("q16").view(np.uint32), seg_part.scales("q16")[first:].view(np.uint32))
    main.verify()
