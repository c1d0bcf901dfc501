"""Compaction under SIGKILL and with readers in other processes.

After a kill at any moment of a compaction the store must open at the old or
the new commit (its segment count says which), pass ``verify``, and hold every
row exactly once with the values a clean run computes; the next writer cleans
up what the dead one left.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import actstore
import actstore.storage.files as files_mod

from . import harness as h

#: The store before compaction: these commits (rows each).
COMMITS = [37, 5, 60, 1, 23, 40, 11, 30]
TOTAL = sum(COMMITS)


def build(path: str) -> None:
    with actstore.create(path, h.FIELDS) as s:
        s.merge_policy = None
        lo = 0
        for n in COMMITS:
            h.append_range(s, lo, lo + n)
            s.commit()
            lo += n


def compact_child(path: str, log_path: str, kill_at: int | None) -> None:
    """Compact the store; with ``kill_at``, SIGKILL itself at that call of fsync_dir (counted from 1)."""
    log = h.Log(log_path)
    real = files_mod.fsync_dir
    calls = [0]

    def counting(d: str) -> None:
        calls[0] += 1
        if kill_at is not None and calls[0] == kill_at:
            log(f"KILLED at fsync_dir {calls[0]}")
            os.kill(os.getpid(), signal.SIGKILL)
        real(d)

    files_mod.fsync_dir = counting  # (modules bound it as fsio.fsync_dir: patched through the module)
    s = actstore.open(path, mode="a")
    log("opened")
    report = s.compact()
    log(f"COMPACTED {report.segments_after} {calls[0]}")
    s.close()
    log("closed")


def check_after(path: str) -> int:
    """Open (a reader), verify, check every row; returns the segment count (old or new commit)."""
    with actstore.open(path) as s:
        s.verify()
        segments = len(s.manifest.segments)
        assert segments in (1, len(COMMITS)), segments
        h.assert_rows(s, TOTAL)
    with actstore.open(path, mode="a") as w:  # the next writer cleans up, and can compact
        w.compact()
    assert not h.leftovers(path), h.leftovers(path)
    with actstore.open(path) as s:
        assert len(s.manifest.segments) == 1
        h.assert_rows(s, TOTAL)
    return segments


@pytest.fixture(scope="module")
def clean_calls(tmp_path_factory: pytest.TempPathFactory) -> int:
    d = tmp_path_factory.mktemp("clean")
    path, log = str(d / "s"), str(d / "log")
    build(path)
    p = h.start(compact_child, path, log, None)
    p.join(120)
    assert p.exitcode == 0, h.read_log(log)
    line = next(x for x in h.read_log(log) if x.startswith("COMPACTED"))
    assert line.split()[1] == "1"
    assert check_after(path) == 1
    return int(line.split()[2])


def kill_case(tmp_path: Path, kill_at: int) -> int:
    path, log = str(tmp_path / f"s{kill_at}"), str(tmp_path / f"log{kill_at}")
    build(path)
    h.count("kill_points")
    p = h.start(compact_child, path, log, kill_at)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, h.read_log(log)
    segments = check_after(path)
    h.count("kill_points_survived")
    return segments


def test_kill_during_compaction(tmp_path: Path, clean_calls: int) -> None:
    """The first, a middle and the last fsync points of a compaction (the last: after the commit point)."""
    seen = {kill_case(tmp_path, k) for k in sorted({1, clean_calls // 2, clean_calls})}
    assert seen == {1, len(COMMITS)}  # both outcomes happened: before and after the commit point


@pytest.mark.slow
def test_kill_during_compaction_everywhere(tmp_path: Path, clean_calls: int) -> None:
    for k in range(1, clean_calls + 1):
        kill_case(tmp_path, k)


@pytest.mark.slow
def test_kill_during_compaction_at_random_times(tmp_path: Path) -> None:
    rng = random.Random(14)
    for i in range(6):
        path, log = str(tmp_path / f"r{i}"), str(tmp_path / f"rlog{i}")
        build(path)
        p = h.start(compact_child, path, log, None)
        assert h.wait_for(log, ["opened"], p) is not None, h.read_log(log)
        time.sleep(rng.uniform(0, 0.05))
        h.count("kill_points")
        h.kill(p)
        check_after(path)
        h.count("kill_points_survived")


def reader_loop(path: str, out: str, seconds: float) -> None:
    """Read every row again and again (refreshing) while another process compacts: whole commits only."""
    log = h.Log(out)
    s = actstore.open(path)
    end = time.monotonic() + seconds
    reads = 0
    while time.monotonic() < end:
        h.assert_rows(s, TOTAL)
        reads += 1
        s.refresh()
    log(f"READS {reads} {len(s.manifest.segments)}")


def test_readers_in_other_processes_during_compaction(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    build(path)
    outs = [str(tmp_path / f"reader{i}") for i in range(2)]
    readers = [h.start(reader_loop, path, out, 3.0) for out in outs]
    time.sleep(0.5)
    with actstore.open(path, mode="a") as w:
        w.compact()
        assert len(w.manifest.segments) == 1
    for p in readers:
        p.join(60)
        assert p.exitcode == 0
    for out in outs:
        line = h.read_log(out)[-1].split()
        assert line[0] == "READS" and int(line[1]) > 0 and line[2] == "1"  # they saw the compacted commit too
    assert np.array_equal(actstore.open(path).lookup(h.keys_array(0, TOTAL)), np.arange(TOTAL))
