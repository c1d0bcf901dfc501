"""A merge keeps only the range it is working on mapped in: a checked source file drops the pages it has hashed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.storage.checksum import RELEASE_BYTES, CheckedFile, hash_file

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")


def _resident_kb(path: str) -> int:
    """Resident kB of this process's maps of ``path``."""
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:
                mine = len(parts) >= 6 and parts[5] == path
            elif mine and line.startswith("Rss:"):
                total += int(parts[1])
    return total


def test_a_checked_file_drops_what_it_has_hashed(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    data = np.random.default_rng(0).integers(0, 255, 4 * RELEASE_BYTES, dtype=np.uint8)
    data.tofile(path)
    record = {"size": data.nbytes, "blake3": hash_file(path, data.nbytes)}
    f = CheckedFile(path, record, "f")
    rows = f.array(np.dtype(np.uint8), (data.nbytes,))
    step = RELEASE_BYTES // 2
    for a in range(0, 3 * RELEASE_BYTES, step):  # the ranges a merge copies, in order
        f.consume(a, memoryview(rows[a : a + step]))
        assert _resident_kb(path) * 1024 <= 2 * RELEASE_BYTES  # not the whole file so far
    f.finish()  # the rest, hashed a range at a time: the check still holds
    assert _resident_kb(path) * 1024 <= 2 * RELEASE_BYTES
    assert np.array_equal(rows[-10:], data[-10:])  # dropped pages read back the same bytes
    bad = CheckedFile(path, {"size": data.nbytes, "blake3": "0" * 64}, "f")
    with pytest.raises(actstore.CorruptStoreError, match="checksum mismatch"):
        bad.finish()


def test_compaction_of_a_large_segment_maps_a_range_at_a_time(tmp_path: Path) -> None:
    store = actstore.create(tmp_path / "s", {"h": actstore.Field((1024,), "float32")})
    store.merge_policy = None
    rows = 3 * RELEASE_BYTES // 4096  # one segment of 3 x RELEASE_BYTES, then a small one
    block = np.random.default_rng(1).standard_normal((rows, 1024)).astype(np.float32)
    store.append(actstore.keys(range(rows)), {"h": block})
    store.commit()
    store.append(actstore.keys(range(rows, rows + 10)), {"h": block[:10]})
    store.commit()
    seen: list[int] = []
    consume = CheckedFile.consume

    def watched(self: CheckedFile, start: int, data: memoryview | bytes) -> None:
        consume(self, start, data)
        seen.append(_resident_kb(self.path) * 1024)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckedFile, "consume", watched)
        store.compact()
    assert seen and max(seen) <= 2 * RELEASE_BYTES
    assert len(store.manifest.segments) == 1
    assert np.array_equal(store.gather(np.arange(rows - 3, rows + 2))["h"].numpy(),
                          np.concatenate([block[-3:], block[:2]]))
    store.close()
