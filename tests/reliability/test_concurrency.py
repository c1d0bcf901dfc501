"""Concurrency: readers in other processes while a writer commits; two writers; stale locks."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
import actstore.engine.commit as commit_mod
from actstore.storage.local import LocalBackend

from . import harness as h


def run_readers_during_writes(tmp_path: Path, commits: int, readers: int, pause: float) -> dict[str, Any]:
    path = str(tmp_path / "s")
    h.make_store(path)
    plan = h.make_plan(h.INITIAL_ROWS, commits=commits, rows_per_commit=25, appends=1)
    counts = [h.INITIAL_ROWS] + [appends[-1][1] for appends, _ in plan]
    duration = 300.0  # at most: the readers stop once the writer is done
    stop = str(tmp_path / "stop")
    outs = [str(tmp_path / f"reader{i}.json") for i in range(readers)]
    # Half the readers refresh() one handle; the others also reopen the store often.
    procs = [h.start(h.reader_child, path, outs[i], counts, duration, i, 0 if i % 2 == 0 else 3, stop)
             for i in range(readers)]
    time.sleep(0.3)
    w = h.start(h.writer_loop, path, str(tmp_path / "wlog"), plan, pause)
    w.join(300)
    assert w.exitcode == 0, h.read_log(str(tmp_path / "wlog"))
    time.sleep(0.2)
    Path(stop).touch()
    for p in procs:
        p.join(duration + 120)
        assert p.exitcode == 0, f"a reader died with exit code {p.exitcode}"
    reports = [json.loads(Path(o).read_text()) for o in outs]
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors
    h.check_store(path, {counts[-1]})
    total = {k: sum(r[k] for r in reports) for k in ("iterations", "refreshes", "opens", "rows_checked")}
    seen = sorted({n for r in reports for n in r["seen"]})
    assert len(seen) > 2, f"readers saw too few commits to mean anything: {seen}"
    h.count("reader_iterations", total["iterations"])
    h.count("rows_checked", total["rows_checked"])
    h.count("writer_commits", commits)
    with actstore.open(path) as s:
        assert len(s.manifest.indexes) <= commit_mod.MAX_INDEX_RUNS
    return {**total, "seen": len(seen)}


def test_readers_see_whole_commits(tmp_path: Path) -> None:
    """12 commits (index runs merged and superseded runs deleted on the way), 2 readers."""
    run_readers_during_writes(tmp_path, commits=12, readers=2, pause=0.02)


@pytest.mark.slow
def test_readers_see_whole_commits_long(tmp_path: Path) -> None:
    run_readers_during_writes(tmp_path, commits=100, readers=3, pause=0.05)


def test_reader_survives_run_merge_between_manifest_and_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a reader that read the manifest just before a commit that merged the index
    runs (and deleted the old ones) failed with CorruptStoreError instead of reading again."""
    path = tmp_path / "s"
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES) as s:
        for lo in range(0, 80, 10):  # 8 commits: 8 runs
            h.append_range(s, lo, lo + 10)
            s.set_view("order", np.arange(lo + 10))
            s.commit()
    stale = LocalBackend(str(path)).read_manifest()
    with actstore.open(path, mode="a") as w:  # the 9th commit merges, deletes the 8 runs and the old view
        h.append_range(w, 80, 90)
        w.set_view("order", np.arange(90))
        w.commit()
    real = LocalBackend.read_manifest
    calls = []

    def first_stale(backend: LocalBackend) -> Any:
        calls.append(backend.root)
        return stale if len(calls) == 1 else real(backend)

    monkeypatch.setattr(LocalBackend, "read_manifest", first_stale)
    with actstore.open(path) as r:
        assert len(r) == 90
        h.assert_rows(r, 90)
    assert len(calls) >= 2


def test_reader_survives_a_compaction_between_a_ragged_fields_offsets_and_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a reader of an older commit that had mapped a ragged field's offsets when a compaction merged the
    segment and deleted its files failed on the values ("data file is missing") instead of reading the merged
    segment (seen once in 8 runs of the long concurrent-readers test)."""
    from actstore.engine.read.snapshot import SegmentReader

    path = tmp_path / "s"
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES) as s:
        s.merge_policy = None
        for lo in range(0, 60, 20):  # three segments
            h.append_range(s, lo, lo + 20)
            s.commit()
    r = actstore.open(path)  # the older commit: three segments, nothing mapped yet
    w = actstore.open(path, mode="a")
    real = SegmentReader._map
    merged: list[bool] = []

    def compact_between(self: Any, rel: str, *args: Any, **kwargs: Any) -> Any:
        if rel.endswith("tok/values") and not merged and self.path.startswith(str(path)):
            merged.append(True)
            w.compact()  # publishes the merged segment and deletes this one's files
        return real(self, rel, *args, **kwargs)

    monkeypatch.setattr(SegmentReader, "_map", compact_between)
    try:
        h.assert_rows(r, 60)
    finally:
        w.close()
        r.close()
    assert merged


def test_old_snapshot_keeps_reading_after_cleanup(tmp_path: Path) -> None:
    """A reader's snapshot stays readable after the writer deleted the index runs and view it maps."""
    path = tmp_path / "s"
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES) as s:
        for lo in range(0, 80, 10):
            h.append_range(s, lo, lo + 10)
            s.set_view("order", np.arange(lo + 10))
            s.commit()
    r = actstore.open(path)
    with actstore.open(path, mode="a") as w:
        for lo in range(80, 200, 10):
            h.append_range(w, lo, lo + 10)
            w.set_view("order", np.arange(lo + 10))
            w.commit()
    assert not h.leftovers(str(path))
    h.assert_rows(r, 80)
    assert np.array_equal(r.view("order"), np.arange(80))
    assert r.refresh()
    h.assert_rows(r, 200)
    r.close()


# --- writers ----------------------------------------------------------------------


def test_two_writers_one_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    h.make_store(path)
    log = str(tmp_path / "log")
    holder = h.start(h.hold_lock, path, log)
    try:
        line = h.wait_for(log, ["holding"], holder)
        assert line is not None
        pid = int(line.split()[1])
        out = str(tmp_path / "loser.json")
        loser = h.start(h.try_write, path, out)
        loser.join(60)
        result = json.loads(Path(out).read_text())
        assert result["ok"] is False and result["blocking"]
        assert f"pid {pid}" in result["error"], result["error"]
        with pytest.raises(actstore.StoreLockedError, match=f"pid {pid}"):  # and in this process
            actstore.open(path, mode="a")
        # Readers are not blocked by a writer.
        h.check_store(path, {h.INITIAL_ROWS})
    finally:
        h.kill(holder)
    h.count("lock_cases")


def test_stale_lock_of_killed_writer_is_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    h.make_store(path)
    log = str(tmp_path / "log")
    holder = h.start(h.hold_lock, path, log)
    assert h.wait_for(log, ["holding"], holder) is not None
    assert os.listdir(os.path.join(path, "segments")) != ["zarr.json"]
    pending = set(os.listdir(os.path.join(path, "segments")))
    h.kill(holder)  # SIGKILL: the kernel drops the flock
    assert holder.exitcode == -signal.SIGKILL
    with actstore.open(path, mode="a") as s:  # takes over, removes the dead writer's pending segment
        assert len(s) == h.INITIAL_ROWS
        assert not h.leftovers(path)
        assert set(os.listdir(os.path.join(path, "segments"))) < pending
        h.append_range(s, 0, h.INITIAL_ROWS + 30)
    h.check_store(path, {h.INITIAL_ROWS + 30})
    h.count("lock_cases")


def test_lock_released_although_a_forked_child_lives(tmp_path: Path) -> None:
    """Regression: a child forked while the store was open (a DataLoader worker, say) kept
    the writer's flock after the writer closed the store, so no other writer could open it."""
    path = str(tmp_path / "s")
    h.make_store(path)
    s = actstore.open(path, mode="a")
    pid = os.fork()
    if pid == 0:  # the child inherits the lock's descriptor, and lingers
        time.sleep(30)
        os._exit(0)
    try:
        s.close()
        with actstore.open(path, mode="a") as s2:
            h.append_range(s2, 0, h.INITIAL_ROWS + 5)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    h.check_store(path, {h.INITIAL_ROWS + 5})
    h.count("lock_cases")


def test_forked_child_cannot_release_the_parents_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    h.make_store(path)
    s = actstore.open(path, mode="a")
    pid = os.fork()
    if pid == 0:  # a child's copy of the handle, finalised or closed, must not unlock the parent's store
        s._writer.lock.release()  # type: ignore[union-attr]
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        with pytest.raises(actstore.StoreLockedError, match=f"pid {os.getpid()}"):
            actstore.open(path, mode="a")
    finally:
        s.close()
    h.count("lock_cases")


def test_killed_writer_with_forked_children_releases_the_lock(tmp_path: Path) -> None:
    """Regression: children forked by a writer (DataLoader workers of precompute) kept its lock
    after the writer was SIGKILLed, so a restarted job was refused until they exited."""
    path = str(tmp_path / "s")
    h.make_store(path)
    log = str(tmp_path / "log")
    holder = h.start(h.hold_lock_with_forked_child, path, log)
    line = h.wait_for(log, ["holding"], holder)
    assert line is not None
    child = int(line.split()[2])
    try:
        h.kill(holder)
        with actstore.open(path, mode="a") as s:  # the forked child still lives
            h.append_range(s, 0, h.INITIAL_ROWS + 5)
    finally:
        os.kill(child, signal.SIGKILL)
    h.check_store(path, {h.INITIAL_ROWS + 5})
    h.count("lock_cases")


def test_file_deleted_between_stat_and_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a superseded view or index run deleted between the size check and the map
    escaped as a bare FileNotFoundError, so a reader did not retry with the newer commit."""
    path = tmp_path / "s"
    h.make_store(path)

    def vanished(filename: Any, *args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", str(filename))

    monkeypatch.setattr(np, "memmap", vanished)
    with pytest.raises(actstore.CorruptStoreError, match="missing"):
        actstore.open(path)
