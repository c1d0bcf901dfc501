"""A compacted store's memory map is made of huge pages wherever a one-commit store's is (reads as fast)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore import Field
from actstore.format.arrays import chunk_path
from actstore.format.layout import FIELDS_DIR, SEGMENTS_DIR

ROWS = 16 * 1024  # 16 MiB of 1 KiB rows: eight 2 MiB huge pages
FIELDS = {"h": Field((512,), "float16")}


def _write(path: Path, commits: int) -> actstore.ActivationStore:
    data = np.random.default_rng(0).standard_normal((ROWS, 512)).astype(np.float16)
    keys = [actstore.key(i) for i in range(ROWS)]
    s = actstore.create(path, FIELDS)
    s.merge_policy = None
    per = ROWS // commits
    for c in range(commits):
        s.append(keys[c * per : (c + 1) * per], {"h": data[c * per : (c + 1) * per]})
        s.commit()
    return s


def _pmd_mapped_kib(store: actstore.ActivationStore) -> int:
    """KiB of the store's data file mapped by huge pages in this process (``FilePmdMapped`` in smaps)."""
    (seg,) = store.manifest.segments
    data = os.path.join(store.path, SEGMENTS_DIR, seg.id, FIELDS_DIR, "h", chunk_path(2))
    store.gather(np.arange(ROWS))  # map the file and touch every page
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.split()[0].count("-") == 1 and ":" not in line.split()[0]:
                inside = line.rstrip().endswith(data)
            elif inside and line.startswith("FilePmdMapped:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_a_compacted_segment_maps_by_huge_pages_as_a_one_commit_segment_does(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", 1)
    ref = _pmd_mapped_kib(one)
    if ref == 0:
        pytest.skip("this kernel or file system does not map page-cache files by huge pages")
    merged = _write(tmp_path / "merged", 8)
    merged.compact()
    assert len(merged.manifest.segments) == 1
    got = _pmd_mapped_kib(merged)
    # all but the 2 MiB pages at the file's two ends (the writes before it was merged left them) are huge
    assert got >= ref - 4096, f"compacted: {got} KiB by huge pages, one commit: {ref} KiB"
    assert np.array_equal(merged.gather(np.arange(ROWS))["h"].numpy(), one.gather(np.arange(ROWS))["h"].numpy())


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_a_segment_appended_in_small_batches_maps_by_huge_pages(tmp_path: Path) -> None:
    one = _write(tmp_path / "one", 1)
    ref = _pmd_mapped_kib(one)
    if ref == 0:
        pytest.skip("this kernel or file system does not map page-cache files by huge pages")
    data = np.random.default_rng(1).standard_normal((ROWS, 512)).astype(np.float16)
    s = actstore.create(tmp_path / "small", FIELDS)
    for i in range(0, ROWS, 100):  # 100 KiB appends, as a precompute's writer makes them
        s.append([actstore.key(j) for j in range(i, min(ROWS, i + 100))], {"h": data[i : i + 100]})
    s.commit()
    got = _pmd_mapped_kib(s)
    assert got >= ref - 2048, f"appended in small batches: {got} KiB by huge pages, one append: {ref} KiB"
    assert np.array_equal(s.gather(np.arange(ROWS))["h"].numpy(), data)
