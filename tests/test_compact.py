"""Compaction: merged segments through the one commit, readers across it, and the automatic tiered merge."""

from __future__ import annotations

import datetime
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
import actstore.engine.lifecycle.compaction as compaction_mod
import actstore.engine.write.segments as segments_mod
import actstore.storage.files as files_mod
from actstore import Field, StoreLockedError, TieredMerge
from actstore.cli import main as cli_main
from actstore.engine.read.maps import map_range, map_rows
from actstore.errors import CorruptStoreError
from actstore.training.recycled import CachedDataset
from tests import data_helpers as h

FIELDS = {"h": Field((4,), "float16"), "tok": Field((None, 3), "float32"), "label": Field((), "int64")}


def batch(lo: int, hi: int) -> tuple[list[bytes], dict[str, Any]]:
    """Rows ``lo .. hi-1``: each row's values depend on its number only."""
    rngs = [np.random.default_rng(i) for i in range(lo, hi)]
    return [actstore.key(i) for i in range(lo, hi)], {
        "h": np.array([g.standard_normal(4) for g in rngs], np.float16).reshape(-1, 4),
        "tok": [g.standard_normal((i % 4, 3)).astype(np.float32) for g, i in zip(rngs, range(lo, hi), strict=True)],
        "label": np.arange(lo, hi) * 7,
    }


def make(path: Path, sizes: list[int], *, policy: TieredMerge | None = None,
         fields: dict[str, Field] | None = None) -> actstore.ActivationStore:
    s = actstore.create(path, fields or FIELDS)
    s.merge_policy = policy
    lo = 0
    for n in sizes:
        keys, values = batch(lo, lo + n)
        assert s.append(keys, values) == n
        s.commit()
        lo += n
    return s


def expected(n: int) -> tuple[list[bytes], dict[str, Any]]:
    return batch(0, n)


def assert_rows(store: actstore.ActivationStore, n: int) -> None:
    """Every row, key and value as written, at its original row number."""
    keys, values = expected(n)
    assert len(store) == n
    got = store.gather(np.arange(n))
    assert np.array_equal(got["h"].numpy(), values["h"])
    assert np.array_equal(got["label"].numpy(), values["label"])
    for i in range(n):
        assert np.array_equal(got["tok"][i].numpy(), values["tok"][i]), i
    assert store.lookup(keys).tolist() == list(range(n))
    assert [bytes(k) for k in store.key_at(np.arange(n))] == keys
    for i in (0, n // 2, n - 1):
        assert np.array_equal(store[i]["h"].numpy(), values["h"][i])


def listed(path: Path, sub: str = "segments") -> set[str]:
    return set(os.listdir(path / sub)) - {"zarr.json"}


def test_compact_merges_all_segments_and_keeps_rows_keys_views(tmp_path: Path) -> None:
    path = tmp_path / "s"
    s = make(path, [3, 5, 1, 7, 4])
    s.set_view("rev", np.arange(20)[::-1])
    s.commit()
    old = {seg.id for seg in s.manifest.segments}
    gen = s.generation
    report = s.compact()
    assert not report.noop and report.segments_before == 5 and report.segments_after == 1
    assert report.rows_copied == 20 and s.generation == gen + 1
    assert len(s.manifest.segments) == 1 and s.manifest.segments[0].id not in old
    assert listed(path) == {s.manifest.segments[0].id}  # superseded files deleted after the swap
    assert_rows(s, 20)
    assert s.view("rev").tolist() == list(range(20))[::-1]
    s.close()
    r = actstore.open(path)
    assert_rows(r, 20)
    assert r.verify().rows == 20


def test_compact_of_an_empty_or_one_segment_store_is_a_noop(tmp_path: Path) -> None:
    s = make(tmp_path / "e", [])
    gen = s.generation
    report = s.compact()
    assert report.noop and s.generation == gen and "nothing to compact: 0 segments" in str(report)
    s.close()
    s = make(tmp_path / "one", [6])
    seg = s.manifest.segments[0].id
    report = s.compact()
    assert report.noop and "nothing to compact: 1 segment " in str(report)
    assert s.manifest.segments[0].id == seg and s.generation == 1
    s.close()


def test_compact_commits_pending_rows_first(tmp_path: Path) -> None:
    s = make(tmp_path / "s", [4, 4])
    keys, values = batch(8, 11)
    s.append(keys, values)
    s.compact()
    assert len(s.manifest.segments) == 1 and s.pending == 0
    assert_rows(s, 11)
    s.close()


def test_compact_refuses_readers_and_a_second_writer_names_the_holder(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    w = make(path, [2, 2])
    with actstore.open(path) as r, pytest.raises(actstore.StoreError, match="read-only"):
        r.compact()
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        actstore.open(path, mode="a")
    assert cli_main(["compact", str(path)]) == 1
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    w.close()
    assert cli_main(["compact", str(path)]) == 0
    assert "merged 2 segments into 1" in capsys.readouterr().out
    assert cli_main(["compact", str(path)]) == 0
    assert "nothing to compact: 1 segment" in capsys.readouterr().out
    assert_rows(actstore.open(path), 4)


def test_readers_of_the_older_commit_keep_reading(tmp_path: Path) -> None:
    """A reader that mapped some segments keeps its maps; one that had not finds the rows in the merged one."""
    path = tmp_path / "s"
    w = make(path, [3, 4, 5, 6])
    mapped = actstore.open(path)
    assert_rows(mapped, 18)  # everything mapped before the compaction
    partly = actstore.open(path)
    first = partly[0]["h"].clone()  # segment 0 mapped, the others not
    fresh = actstore.open(path)  # nothing mapped
    w.compact()
    assert listed(path) == {w.manifest.segments[0].id}
    for r in (mapped, partly, fresh):
        assert len(r.manifest.segments) == 4  # still the older commit
        assert_rows(r, 18)
    assert torch.equal(partly[0]["h"], first)
    # a second compaction (new rows, merged again) while `again` holds the first merged commit unmapped
    again = actstore.open(path)
    keys, values = batch(18, 21)
    w.append(keys, values)
    w.commit()
    w.compact()
    assert_rows(again, 18)
    assert again.refresh() and len(again.manifest.segments) == 1
    assert_rows(again, 21)
    w.close()


def test_a_missing_segment_that_was_not_compacted_is_still_reported(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make(path, [3, 4]).close()
    r = actstore.open(path)
    shutil.rmtree(path / "segments" / r.manifest.segments[1].id)
    with pytest.raises(CorruptStoreError, match="missing"):
        r.gather([5])


def test_a_reader_never_relocates_into_another_store_at_the_same_path(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Same path, creation time, fields and row count, a newer generation: still not the reader's rows."""
    import actstore.store.api as store_mod

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(store_mod._dt, "datetime", Clock)
    path = tmp_path / "s"
    make(path, [3, 4]).close()
    r = actstore.open(path)
    shutil.rmtree(path)
    other = actstore.create(path, FIELDS)
    for lo, hi in ((100, 104), (104, 107)):
        other.append(*batch(lo, hi))
        other.commit()
    other.compact()
    assert other.manifest.created == r.manifest.created and other.generation > r.generation
    other.close()
    with pytest.raises(CorruptStoreError, match="missing"):
        r.gather([5])


def test_cached_dataset_survives_compaction(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 50, kind="tuple", commit_every=7)
    ds = CachedDataset(data, path)
    before = [ds[i] for i in range(50)]
    with actstore.open(path, mode="a") as w:
        assert len(w.manifest.segments) == 8
        w.compact()
    for i in range(50):  # the dataset built on the older commit
        assert torch.equal(ds[i][0], before[i][0]) and ds[i][1] == before[i][1]
    ds2 = CachedDataset(data, path)  # and one built on the compacted store
    assert len(actstore.open(path).manifest.segments) == 1
    for i in range(50):
        assert torch.equal(ds2[i][0], before[i][0]) and ds2[i][1] == before[i][1]


def test_compressed_fields_compact(tmp_path: Path) -> None:
    fields = {"h": Field((4,), "float16", compression="zstd"),
              "tok": FIELDS["tok"], "label": FIELDS["label"]}
    s = make(tmp_path / "s", [5, 6, 2], fields=fields)
    s.compact()
    assert_rows(s, 13)
    s.close()
    assert actstore.open(tmp_path / "s").verify().rows == 13


def test_enospc_during_compaction_leaves_the_last_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    s = make(path, [3, 4, 5])
    before = listed(path)
    gen = s.generation
    real = segments_mod.ShardFile.finish
    calls = {"n": 0}

    def full(self: Any, chunk_bytes: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, chunk_bytes)

    monkeypatch.setattr(segments_mod.ShardFile, "finish", full)
    with pytest.raises(OSError, match="No space"):
        s.compact()
    monkeypatch.undo()
    assert s.generation == gen and len(s.manifest.segments) == 3
    assert listed(path) == before  # the partial merged segment is gone
    assert_rows(s, 12)
    s.close()
    r = actstore.open(path)
    assert r.generation == gen and r.verify().rows == 12


# --- the tiered policy -------------------------------------------------------------------------


def test_tiered_plan() -> None:
    p = TieredMerge(fanout=4, min_rows=10)
    assert [p.tier(r) for r in (0, 1, 9, 10, 39, 40, 159, 160, 640)] == [0, 0, 0, 0, 0, 1, 1, 2, 3]
    assert p.plan([5, 5, 5]) is None
    assert p.plan([5, 5, 5, 5]) == (0, 4)
    assert p.plan([100, 5, 5, 5, 5]) == (1, 5)
    assert p.plan([50, 50, 50, 10, 10, 10, 10]) == (0, 7)  # the merged 40 joins the 50s: one cascade
    assert p.plan([500, 5, 5, 5]) is None
    with pytest.raises(ValueError, match="fanout"):
        TieredMerge(fanout=1)
    with pytest.raises(ValueError, match="min_rows"):
        TieredMerge(min_rows=0)


def test_automatic_merge_keeps_the_segment_count_logarithmic(tmp_path: Path) -> None:
    path = tmp_path / "s"
    policy = TieredMerge(fanout=4)
    s = make(path, [], policy=policy)
    lo, most = 0, 0
    for c in range(64):
        keys, values = batch(lo, lo + 3)
        s.append(keys, values)
        s.commit()
        lo += 3
        n = len(s.manifest.segments)
        most = max(most, n)
        assert n <= 3 * (policy.tier(lo) + 1), (c, [seg.rows for seg in s.manifest.segments])
        assert listed(path) == {seg.id for seg in s.manifest.segments}
    assert len(s.manifest.segments) == 1 and most <= 9  # 64 = 4**3 commits of one size merge into one
    assert_rows(s, lo)
    s.close()
    assert actstore.open(path).verify().rows == lo


def test_default_policy_and_disabling_it(tmp_path: Path) -> None:
    s = make(tmp_path / "d", [1] * 15, policy=TieredMerge())  # the default: fanout 16
    assert len(s.manifest.segments) == 15
    keys, values = batch(15, 16)
    s.append(keys, values)
    s.commit()
    assert len(s.manifest.segments) == 1
    assert_rows(s, 16)
    s.close()
    s = make(tmp_path / "off", [1] * 17, policy=None)
    assert len(s.manifest.segments) == 17
    s.close()
    assert isinstance(actstore.open(tmp_path / "off").merge_policy, TieredMerge)


def test_a_failed_automatic_merge_keeps_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make(tmp_path / "s", [2, 2, 2], policy=TieredMerge(fanout=4))

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compaction_mod, "merge_range", full)
    s.append(*batch(6, 8))
    with pytest.warns(RuntimeWarning, match="automatic merge of segments 0..3 failed"):
        s.commit()
    monkeypatch.undo()
    assert len(s.manifest.segments) == 4 and s.pending == 0  # the rows are committed
    assert_rows(s, 8)
    s.append(*batch(8, 10))
    s.commit()  # the next commit merges the newest four
    assert [seg.rows for seg in s.manifest.segments] == [2, 8]
    assert_rows(s, 10)
    s.close()


def test_compaction_on_object_storage(s3_url: str, tmp_path: Path, s3_server: Any) -> None:
    opts = s3_server.storage_options
    w = actstore.create(s3_url, FIELDS, cache_dir=tmp_path / "writer-cache", storage_options=opts)
    w.merge_policy = None
    for lo, hi in ((0, 3), (3, 7), (7, 12)):
        w.append(*batch(lo, hi))
        w.commit()
    reader = actstore.open(s3_url, cache_dir=tmp_path / "reader-cache", storage_options=opts)  # nothing mapped yet
    old = {seg.id for seg in w.manifest.segments}
    report = w.compact()
    assert report.segments_after == 1
    assert w.objects.exists(f"segments/{w.manifest.segments[0].id}/zarr.json")
    assert not any(w.objects.exists(f"segments/{i}/zarr.json") for i in old)  # deleted from the bucket after the swap  # superseded segments deleted from the bucket after the swap
    assert_rows(w, 12)
    w.close()
    assert_rows(reader, 12)  # the older commit's rows, from the merged segment
    fresh = actstore.open(s3_url, cache_dir=tmp_path / "fresh-cache", storage_options=opts)
    assert len(fresh.manifest.segments) == 1 and fresh.verify().rows == 12
    assert_rows(fresh, 12)


def test_a_deleted_store_reports_its_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make(path, [3, 4]).close()
    r = actstore.open(path)
    shutil.rmtree(path)  # no manifest to relocate through: the reader names the missing file
    with pytest.raises(CorruptStoreError, match="missing"):
        r.gather([5])


# --- copies of whole maps: written in 2 MiB-aligned pieces ----------------------------------------


@pytest.fixture
def by_range(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the maps copied whole as a range of their file; returns the byte counts that were."""
    copied: list[int] = []
    real = segments_mod.ShardFile.copy

    def counting(self: Any, rows: np.ndarray, source: Any, hasher: Any = None) -> int:
        copied.append(rows.nbytes)
        return real(self, rows, source, hasher)

    monkeypatch.setattr(segments_mod.ShardFile, "copy", counting)
    return copied


def test_plain_fields_are_copied_by_file_range(tmp_path: Path, by_range: list[int]) -> None:
    fields = {**FIELDS, "b": Field((2,), "bfloat16")}
    s = actstore.create(tmp_path / "s", fields)
    s.merge_policy = None
    for lo, hi in ((0, 5), (5, 6), (6, 13)):
        keys, values = batch(lo, hi)
        s.append(keys, {**values, "b": torch.arange(2 * (hi - lo)).reshape(-1, 2).to(torch.bfloat16)})
        s.commit()
    s.compact()
    assert len(s.manifest.segments) == 1 and by_range  # keys, h, label, tok's values: by range
    assert_rows(s, 13)
    assert s.gather([12])["b"].tolist() == [[12.0, 13.0]]  # type: ignore[union-attr]
    s.close()
    assert actstore.open(tmp_path / "s").verify().rows == 13  # every file's BLAKE3 is the bytes copied


def test_a_copy_hashes_the_file_not_the_writers_private_pages(tmp_path: Path, by_range: list[int]) -> None:
    s = make(tmp_path / "s", [4, 4])
    s[1]["h"][:] = 0  # writes to this process's copy-on-write page of the map, never to the file
    s.compact()
    assert by_range
    s.close()
    r = actstore.open(tmp_path / "s")
    assert r.verify().rows == 8
    assert_rows(r, 8)  # row 1 as committed


def test_a_copy_never_uses_the_kernels_file_range_copy(tmp_path: Path, by_range: list[int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # os.copy_file_range leaves the merged file's page cache in small folios, which a map cannot map by huge
    # pages: the merged segment read slower than a one-commit store (0.55-0.8x in bench_store).
    def refuse(*args: Any) -> int:
        raise AssertionError("compaction called os.copy_file_range")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    s = make(tmp_path / "s", [3, 6, 2])
    s.compact()
    assert by_range
    assert_rows(s, 11)
    s.close()
    assert actstore.open(tmp_path / "s").verify().rows == 11


def test_enospc_during_a_copy_leaves_the_last_commit(tmp_path: Path, by_range: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    s = make(path, [3, 4, 5])
    before, gen = listed(path), s.generation

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        s.compact()
    assert s.generation == gen and listed(path) == before
    monkeypatch.undo()
    assert_rows(s, 12)


def test_map_range(tmp_path: Path) -> None:
    data = np.arange(5000, dtype=np.int32)
    path = tmp_path / "f"
    data.tofile(path)
    m = map_rows(str(path), 1000, (5,), np.dtype(np.int32))
    assert map_range(m) == (str(path), 0)
    assert map_range(m[7:9]) == (str(path), 7 * 20)
    assert map_range(m[:, 1:]) is None and map_range(np.zeros(3)) is None  # not contiguous; not a map


def test_a_huge_page_file_writes_whole_2mib_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = files_mod.HUGE_PAGE_BYTES
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 255, n, np.uint8) for n in (3, 100_000, 5 * huge + 123, huge - 7, 2 * huge, 11)]
    ends: list[int] = []
    real_write, real_writev = os.write, os.writev

    def write(fd: int, b: Any) -> int:
        n = real_write(fd, b)
        ends.append(os.lseek(fd, 0, os.SEEK_CUR))
        return n

    def writev(fd: int, bufs: Any) -> int:  # (the held bytes and the head of the next part, in one call)
        n = real_writev(fd, bufs)
        ends.append(os.lseek(fd, 0, os.SEEK_CUR))
        return n

    f = files_mod.HugePageFile(str(tmp_path / "out"))
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    for p in parts:
        assert f.write(p) == p.nbytes
    assert f.tell() == sum(p.nbytes for p in parts)
    f.close()
    monkeypatch.undo()
    assert (tmp_path / "out").read_bytes() == b"".join(p.tobytes() for p in parts)
    # every write call but the last (the flush at close) ends on a 2 MiB boundary and covers one range
    assert ends[:-1] == [k * huge for k in range(1, len(ends))] and ends[-1] == f.tell()


@pytest.mark.parametrize("cut", [1, 1000, 2_000_000, 2_200_000])
def test_a_huge_page_file_finishes_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    huge = files_mod.HUGE_PAGE_BYTES
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 255, n, np.uint8) for n in (huge - 5, 3 * huge + 9, 17)]
    real_write, real_writev = os.write, os.writev
    short = [True, True]  # the first write and the first writev each take only ``cut`` bytes

    def write(fd: int, b: Any) -> int:
        if short[0]:
            short[0] = False
            return real_write(fd, memoryview(b)[: min(cut, len(b) - 1)])
        return real_write(fd, b)

    def writev(fd: int, bufs: Any) -> int:
        if short[1]:
            short[1] = False
            joined = b"".join(bytes(x) for x in bufs)
            return real_write(fd, joined[: min(cut, len(joined) - 1)])
        return real_writev(fd, bufs)

    f = files_mod.HugePageFile(str(tmp_path / "out"))
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "writev", writev)
    for p in parts:
        f.write(p)
    f.close()
    monkeypatch.undo()
    assert not any(short)
    assert (tmp_path / "out").read_bytes() == b"".join(p.tobytes() for p in parts)
