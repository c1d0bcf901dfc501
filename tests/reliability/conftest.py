"""Reliability suite: every test here is marked ``reliability``; long ones also ``slow``.

Quick mode (part of the default run)::

    python -m pytest tests/reliability

Full mode (quick and slow tests)::

    python -m pytest -m reliability tests/reliability

At the end of a session the counts of what was tried (kill points, power cuts,
corruptions, fuzz examples, concurrent reads, injected faults) are printed in
the terminal summary and written to ``tests/reliability/last_run.json``.

Most of the wall time is ``fsync``: on a machine whose disk is busy with other
writers, ``--basetemp=/dev/shm/actstore-rel`` (a tmpfs) makes the suite several
times faster without weakening it — crash checks kill processes (the page cache
survives) and power cuts are simulated from a journal of the writer's calls.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytest

from .harness import STATS

HERE = Path(__file__).resolve().parent
_started = time.time()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.reliability)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and HERE in Path(str(report.fspath)).resolve().parents:
        STATS["failed_tests"] += 1


def _summary() -> dict[str, Any]:
    s = dict(STATS)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - _started, 1),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "counts": dict(sorted(s.items())),
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not STATS:
        return
    s = _summary()
    c = s["counts"]
    tr = terminalreporter
    tr.section("actstore reliability")

    def line(label: str, tried: str, ok: str, extra: str = "") -> None:
        if c.get(tried):
            tr.write_line(f"{label:<34} {c.get(ok, 0):>6} of {c[tried]:>6} {extra}")

    line("kill points survived", "kill_points", "kill_points_survived", "(SIGKILL, then open+verify+resume)")
    line("power cuts survived", "power_cuts", "power_cuts_survived", "(unsynced data and entries dropped)")
    line("corruptions detected by verify", "corruptions", "corruptions_detected")
    line("corrupt reads safe (verify_reads)", "corruptions", "corruptions_reads_safe", "(raised or exact values)")
    if c.get("corruptions"):
        plain = ", ".join(f"{k[12:].replace('_', ' ')} {v}" for k, v in c.items() if k.startswith("plain_reads_"))
        tr.write_line(f"{'  reads without verify_reads':<34} {plain}")
    line("injected I/O faults survived", "faults", "faults_survived", "(ENOSPC/EIO, store intact)")
    line("damage kept through compact()", "compactions_of_damaged_stores", "damage_reported_after_compaction",
         f"(compact refused {c.get('compactions_refused', 0)}; verify still names every one)")
    line("cached-file corruptions caught", "cache_corruptions", "cache_corruptions_caught",
         "(remote store: exact values, verify clean)")
    line("concurrent reader iterations ok", "reader_iterations", "reader_iterations")
    for k in ("automatic_merges_over_damage", "forked_writes_refused", "spawned_writes_refused", "encoder_worker_runs",
              "encoder_misses_stored_once", "fuzz_examples", "atheris_runs", "api_cases", "writer_commits",
              "rows_checked", "crash_children"):
        if c.get(k):
            tr.write_line(f"{k.replace('_', ' '):<34} {c[k]:>6}")
    # Every check above fails its test on the first lost row or wrong value: zero failed tests, zero losses.
    failed = c.get("failed_tests", 0)
    verdict = "     0" if not failed else f"unknown: {failed} reliability test(s) failed"
    tr.write_line(f"{'lost committed rows':<34} {verdict}")
    tr.write_line(f"{'wrong values returned':<34} {verdict}")
    tr.write_line(f"written to {HERE / 'last_run.json'}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if STATS:
        s = _summary()
        s["exitstatus"] = int(exitstatus)
        s["markexpr"] = session.config.getoption("markexpr", "")
        (HERE / "last_run.json").write_text(json.dumps(s, indent=1) + "\n")
