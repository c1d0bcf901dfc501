"""Crash testing: SIGKILL a writer at chosen and random moments; simulate power loss.

After every kill the store must open, pass ``verify``, hold exactly the rows of
a commit that could have completed (never fewer than the last commit that
returned), with the values a clean run computes; and a restarted job (reopen,
append everything again, commit) must end with exactly the full set of rows.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

import actstore

from . import harness as h

#: The child's work: 12 commits of 40 rows in 2 appends each, a view every 3rd
#: commit; with the initial commit that is 13 index runs, so runs get merged
#: (and superseded runs deleted) along the way.
PLAN = h.make_plan(h.INITIAL_ROWS, commits=12, rows_per_commit=40)
TOTAL = h.plan_total(PLAN)


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted child run: how often each pause target is called, and how long it takes."""
    d = tmp_path_factory.mktemp("clean")
    path, log = str(d / "s"), str(d / "log")
    h.make_store(path)
    t = time.monotonic()
    p = h.start(h.writer_child, path, log, PLAN, None)
    p.join(120)
    assert p.exitcode == 0, h.read_log(log)
    seconds = time.monotonic() - t
    counts = next(json.loads(line[7:]) for line in h.read_log(log) if line.startswith("COUNTS "))
    h.check_store(path, {TOTAL})
    return {"counts": counts, "seconds": seconds}


def crash_case(tmp_path: Path, pause: tuple[str, int, str] | None = None, delay: float | None = None) -> dict[str, Any]:
    """Run the plan in a child, SIGKILL it (at ``pause`` or after ``delay`` s), then check and resume."""
    path, log = str(tmp_path / "s"), str(tmp_path / "log")
    h.make_store(path)
    h.count("kill_points")
    p = h.start(h.writer_child, path, log, PLAN, pause)
    h.count("crash_children")
    try:
        if pause is not None:
            where = h.wait_for(log, ["PAUSED"], p)
            assert where is not None or p.exitcode == 0, f"the child failed before {pause}: {h.read_log(log)[-3:]}"
        else:
            assert h.wait_for(log, ["opened"], p) is not None, h.read_log(log)
            time.sleep(delay or 0.0)
            where = f"after {delay:.3f} s"
    finally:
        h.kill(p)
    lines = h.read_log(log)
    last, allowed = h.allowed_counts(lines, h.INITIAL_ROWS)
    n = h.check_store(path, allowed)
    assert n >= last, f"lost the commit of {last} rows that returned before the kill"
    h.resume_and_check(path, TOTAL)
    h.count("kill_points_survived")
    h.count("rows_checked", n + TOTAL)
    return {"where": where, "rows": n, "allowed": sorted(allowed)}


# One kill point per phase of a commit, placed in the middle of the run.
QUICK_POINTS = [
    ("append", 0.5, "before"),  # buffering rows into shard files
    ("finish", 0.5, "after"),  # a shard finished and fsynced, others not yet
    ("write_durable", 0.7, "before"),  # metadata / manifest temp file
    ("fsync", 0.4, "before"),
    ("replace", 0.5, "before"),  # just before the commit point
    ("replace", 0.5, "after"),  # renamed, directory not yet fsynced
    ("rmtree", 0.5, "before"),  # deleting superseded index runs / views after a commit
]


@pytest.mark.parametrize("target,where,when", QUICK_POINTS, ids=[f"{t}-{w}" for t, _, w in QUICK_POINTS])
def test_kill_at_phase(tmp_path: Path, clean_run: dict[str, Any], target: str, where: float, when: str) -> None:
    calls = clean_run["counts"][target]
    assert calls > 0, f"the plan never calls {target}"
    crash_case(tmp_path, (target, max(1, round(calls * where)), when))


def test_kill_at_random_time(tmp_path: Path, clean_run: dict[str, Any]) -> None:
    rng = random.Random(1)
    for i in range(2):
        crash_case(tmp_path / str(i), delay=rng.uniform(0, clean_run["seconds"]))


@pytest.mark.slow
def test_kill_points_many(tmp_path: Path, clean_run: dict[str, Any]) -> None:
    """At least 50 kill points: every pause target at 5 random calls, plus 15 random times."""
    rng = random.Random(20261127)
    cases: list[dict[str, Any]] = []
    for target in h.PAUSE_TARGETS:
        calls = clean_run["counts"][target]
        for _ in range(5):
            pause = (target, rng.randint(1, calls), rng.choice(["before", "after"]))
            cases.append({"pause": pause})
    for _ in range(15):
        cases.append({"delay": rng.uniform(0, clean_run["seconds"] * 1.1)})
    assert len(cases) >= 50
    for i, case in enumerate(cases):
        try:
            crash_case(tmp_path / str(i), **case)
        except BaseException as e:
            raise AssertionError(f"kill point {case}: {e}") from e


# --- simulated power loss ---------------------------------------------------------------

POWER_PLAN = h.make_plan(h.INITIAL_ROWS, commits=10, rows_per_commit=30)
POWER_TOTAL = h.plan_total(POWER_PLAN)


@pytest.fixture(scope="session")
def power_ops(tmp_path_factory: pytest.TempPathFactory) -> int:
    d = tmp_path_factory.mktemp("power")
    path = str(d / "s")
    h.make_store(path)
    (d / "saved").mkdir()
    p = h.start(h.powerloss_child, path, str(d / "log"), str(d / "journal"), str(d / "saved"), POWER_PLAN, None)
    p.join(120)
    assert p.exitcode == 0, h.read_log(str(d / "log"))
    ops = next(int(line[4:]) for line in h.read_log(str(d / "log")) if line.startswith("OPS "))
    # Cutting after the last operation must leave the whole run, durable.
    h.power_loss_image(path, str(d / "image"), str(d / "journal"))
    h.check_store(str(d / "image"), {POWER_TOTAL})
    return ops


def power_case(tmp_path: Path, cut_at: int) -> dict[str, Any]:
    path, log, journal = str(tmp_path / "s"), str(tmp_path / "log"), str(tmp_path / "journal")
    (tmp_path / "saved").mkdir(parents=True)
    h.make_store(path)
    h.count("power_cuts")
    p = h.start(h.powerloss_child, path, log, journal, str(tmp_path / "saved"), POWER_PLAN, cut_at)
    p.join(120)
    assert p.exitcode == -9, f"the child was to cut itself off at operation {cut_at}: {h.read_log(log)[-3:]}"
    image = str(tmp_path / "image")
    stats = h.power_loss_image(path, image, journal)
    last, allowed = h.allowed_counts(h.read_log(log), h.INITIAL_ROWS)
    n = h.check_store(image, allowed)
    assert n >= last, f"power loss lost the commit of {last} rows that had returned"
    h.resume_and_check(image, POWER_TOTAL)
    h.count("power_cuts_survived")
    return {"cut_at": cut_at, "rows": n, **stats}


def test_power_loss(tmp_path: Path, power_ops: int) -> None:
    rng = random.Random(7)
    for i in range(3):
        power_case(tmp_path / str(i), rng.randint(1, power_ops))


@pytest.mark.slow
def test_power_loss_many(tmp_path: Path, power_ops: int) -> None:
    rng = random.Random(11)
    # Spread the cuts evenly, jittered, over the whole run (every phase of several commits).
    cuts = sorted({min(power_ops, max(1, int(power_ops * (i + rng.random()) / 40))) for i in range(40)})
    for cut in cuts:
        try:
            power_case(tmp_path / str(cut), cut)
        except BaseException as e:
            raise AssertionError(f"power cut at operation {cut} of {power_ops}: {e}") from e


# --- precompute -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def precompute_clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from . import precompute_case as pc

    d = tmp_path_factory.mktemp("precompute-clean")
    path, log = str(d / "s"), str(d / "log")
    t = time.monotonic()
    p = h.start(h.precompute_child, path, log, pc.N, pc.BATCH, pc.COMMIT_EVERY, None)
    p.join(300)
    assert p.exitcode == 0, h.read_log(log)[-5:]
    seconds = time.monotonic() - t
    counts = next(json.loads(line[7:]) for line in h.read_log(log) if line.startswith("COUNTS "))
    want = pc.expected()
    pc.check(path, None, want, complete=True)
    return {"counts": counts, "seconds": seconds, "want": want}


def precompute_crash_case(tmp_path: Path, clean: dict[str, Any], pause: tuple[str, int, str] | None = None,
                          delay: float | None = None, num_workers: int = 0) -> int:
    """Kill a precompute run; the store holds whole rows of some commit; a rerun completes it exactly."""
    from . import precompute_case as pc

    path, log = str(tmp_path / "s"), str(tmp_path / "log")
    tmp_path.mkdir(parents=True, exist_ok=True)
    h.count("kill_points")
    p = h.start(h.precompute_child, path, log, pc.N, pc.BATCH, pc.COMMIT_EVERY, pause, num_workers)
    h.count("crash_children")
    try:
        if pause is not None:
            where = h.wait_for(log, ["PAUSED"], p, timeout=120)
            assert where is not None or p.exitcode == 0, f"the child failed before {pause}: {h.read_log(log)[-3:]}"
        else:
            assert h.wait_for(log, ["opened"], p) is not None
            time.sleep(delay or 0.0)
    finally:
        h.kill(p)
    last, allowed = h.allowed_counts(h.read_log(log), 0)
    if os.path.exists(os.path.join(path, "zarr.json")):
        n = pc.check(path, allowed, clean["want"], complete=False)
        assert n >= last, f"lost the commit of {last} rows that returned before the kill"
    else:  # killed before create() wrote the first manifest: no store yet
        assert last == 0
        n = 0
    pc.run(path)  # the rerun resumes (at once: DataLoader workers of the killed run may still be alive)
    pc.check(path, None, clean["want"], complete=True)
    h.count("kill_points_survived")
    h.count("rows_checked", n + len(clean["want"]))
    return n


@pytest.mark.parametrize("pause", [("fsync", 0.5, "before"), ("replace", 0.5, "after"), ("mkdir", 0.02, "before")],
                         ids=["fsync", "replace-after", "create"])
def test_kill_precompute(tmp_path: Path, precompute_clean: dict[str, Any], pause: tuple[str, float, str]) -> None:
    calls = precompute_clean["counts"][pause[0]]
    precompute_crash_case(tmp_path, precompute_clean, (pause[0], max(1, round(calls * pause[1])), pause[2]))


def test_kill_resumed_precompute_with_workers(tmp_path: Path, precompute_clean: dict[str, Any]) -> None:
    """A resumed precompute with DataLoader worker processes (forked while the store is open for
    writing), killed mid-run, then rerun at once while its orphaned workers may still live."""
    from . import precompute_case as pc

    path = str(tmp_path / "s")
    first = h.start(h.precompute_child, path, str(tmp_path / "log1"), pc.N, pc.BATCH, pc.COMMIT_EVERY,
                    ("replace", 3, "after"))
    assert h.wait_for(str(tmp_path / "log1"), ["PAUSED"], first) is not None
    h.kill(first)
    assert pc.check(path, None, precompute_clean["want"], complete=False) > 0
    h.count("kill_points")
    log = str(tmp_path / "log2")
    second = h.start(h.precompute_child, path, log, pc.N, pc.BATCH, pc.COMMIT_EVERY, ("fsync", 20, "before"), 2)
    assert h.wait_for(log, ["PAUSED"], second) is not None, h.read_log(log)[-3:]
    h.kill(second)
    last, allowed = h.allowed_counts(h.read_log(log), 0)
    assert pc.check(path, None, precompute_clean["want"], complete=False) >= last
    pc.run(path)
    pc.check(path, None, precompute_clean["want"], complete=True)
    h.count("kill_points_survived")


@pytest.mark.slow
def test_kill_precompute_many(tmp_path: Path, precompute_clean: dict[str, Any]) -> None:
    rng = random.Random(99)
    cases: list[dict[str, Any]] = []
    for target in h.PAUSE_TARGETS:
        calls = precompute_clean["counts"][target]
        for _ in range(2 if calls else 0):
            cases.append({"pause": (target, rng.randint(1, calls), rng.choice(["before", "after"]))})
    cases += [{"delay": rng.uniform(0, precompute_clean["seconds"])} for _ in range(8)]
    for i, case in enumerate(cases):
        try:
            precompute_crash_case(tmp_path / str(i), precompute_clean, **case)
        except BaseException as e:
            raise AssertionError(f"precompute kill point {case}: {e}") from e


@pytest.mark.parametrize("mutation", ["no_root_dir_fsync", "no_file_fsync"])
def test_power_model_catches_a_broken_writer(tmp_path: Path, mutation: str) -> None:
    """The power-loss model is not vacuous: a writer that skips the directory fsync after the
    manifest rename (or every file fsync) loses returned commits or bytes in the image."""
    path, log, journal = str(tmp_path / "s"), str(tmp_path / "log"), str(tmp_path / "journal")
    (tmp_path / "saved").mkdir()
    h.make_store(path)
    p = h.start(h.powerloss_child, path, log, journal, str(tmp_path / "saved"), POWER_PLAN, None, mutation)
    p.join(120)
    assert p.exitcode == 0, h.read_log(log)[-3:]
    h.power_loss_image(path, str(tmp_path / "image"), journal)
    last, allowed = h.allowed_counts(h.read_log(log), h.INITIAL_ROWS)
    assert last == POWER_TOTAL
    with pytest.raises((AssertionError, actstore.StoreError)):
        n = h.check_store(str(tmp_path / "image"), allowed)
        assert n >= last, "lost a returned commit"
