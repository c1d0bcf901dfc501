"""Resource faults: ENOSPC and EIO during append, chunk writing, manifest writing and fsync.

Each case injects one error at one call (the error comes from the patched call
itself, so it strikes exactly where a full disk or a failing device would), then
checks that

* the error reaches the caller as ``OSError`` with its errno;
* the last commit stays intact and readable from another handle;
* the same handle, after the error, can append and commit again (the contract:
  pending rows of a failed append/commit are dropped, committed rows are kept);
* the next writer can open the store, cleans up, and continues.

A real full disk is also tried on a small tmpfs when this process may mount one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
import actstore.engine.commit as commit_mod
import actstore.engine.write.segments as writer_mod
import actstore.storage.files as files_mod

from . import harness as h


class Fault:
    """Counts calls of patched functions; makes call ``nth`` of ``target`` fail with ``err``."""

    def __init__(self, target: str | None = None, nth: int = 0, err: int = errno.EIO) -> None:
        self.target, self.nth, self.err = target, nth, err
        self.calls: dict[str, int] = {}
        self.fired = False
        self.after_replace = False

    def hit(self, name: str) -> bool:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.target == name and self.calls[name] == self.nth and not self.fired:
            self.fired = True
            return True
        return False

    def error(self, what: str) -> OSError:
        return OSError(self.err, f"{os.strerror(self.err)} (injected in {what})")


def _shard_write(fault: Fault, original: Callable[..., Any]) -> Callable[..., Any]:
    def write(self: writer_mod.ShardFile, rows: np.ndarray, *a: Any) -> int:
        if fault.hit("shard_write") and len(rows):
            original(self, rows[: len(rows) // 2], *a)  # part of the batch reached the file
            raise fault.error("ShardFile.write")
        return int(original(self, rows, *a))

    return write


def _write_durable(fault: Fault, original: Callable[..., Any]) -> Callable[..., Any]:
    def write_durable(path: str, data: bytes) -> None:
        if fault.hit("write_durable"):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise fault.error(f"write_durable({os.path.basename(path)})")
        original(path, data)

    return write_durable


@contextlib.contextmanager
def injected(fault: Fault) -> Iterator[Fault]:
    mp = pytest.MonkeyPatch()
    real_fsync, real_replace, real_mkdir = os.fsync, os.replace, os.mkdir

    def fsync(fd: int) -> None:
        after = fault.after_replace
        fault.after_replace = False
        if fault.hit("fsync") or (after and fault.hit("fsync_after_replace")):
            raise fault.error("fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        if fault.hit("replace"):
            raise fault.error("replace")
        real_replace(src, dst)
        fault.after_replace = True

    def mkdir(path: Any, *a: Any, **k: Any) -> None:
        if not os.path.exists(path) and fault.hit("mkdir"):  # (an existing directory fails with EEXIST first)
            raise fault.error("mkdir")
        real_mkdir(path, *a, **k)

    def finish_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def finish(self: writer_mod.ShardFile, chunk_bytes: int) -> Any:
            if fault.hit("finish"):
                raise fault.error("ShardFile.finish")
            return original(self, chunk_bytes)

        return finish

    def index_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def write_index_run(*a: Any, **kw: Any) -> Any:
            if fault.hit("index_run"):
                raise fault.error("write_index_run")
            return original(*a, **kw)

        return write_index_run

    mp.setattr(os, "fsync", fsync)
    mp.setattr(os, "replace", replace)
    mp.setattr(os, "mkdir", mkdir)
    mp.setattr(writer_mod.ShardFile, "write", _shard_write(fault, writer_mod.ShardFile.write))
    mp.setattr(writer_mod.ShardFile, "finish", finish_wrapper(writer_mod.ShardFile.finish))
    mp.setattr(files_mod, "write_durable", _write_durable(fault, files_mod.write_durable))
    mp.setattr(commit_mod, "write_index_run", index_wrapper(commit_mod.write_index_run))
    try:
        yield fault
    finally:
        mp.undo()


TARGETS = ["shard_write", "finish", "write_durable", "fsync", "mkdir", "index_run", "replace", "fsync_after_replace"]
BASE = 60  # rows committed before the faulty work
WORK = [(60, 80), (80, 100)]  # two appends, then one commit (which merges index runs: see prepare)


def prepare(path: Path) -> None:
    """A store of BASE rows in 8 commits, so the faulty commit also merges the index runs."""
    h.from_template(path, "faults", _build)


def _build(path: str) -> None:
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES) as s:
        for lo in range(0, BASE, BASE // 8 + 1):
            h.append_range(s, lo, min(BASE, lo + BASE // 8 + 1))
            s.commit()
        s.set_view("order", np.arange(BASE))
        s.commit()


def faulty_work(s: actstore.ActivationStore) -> None:
    for lo, hi in WORK:
        h.append_range(s, lo, hi)
    s.set_view("order", np.arange(len(s) + s.pending))
    s.commit()


@pytest.fixture(scope="module")
def call_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    path = tmp_path_factory.mktemp("count") / "s"
    prepare(path)
    with injected(Fault()) as f, actstore.open(path, mode="a") as s:
        faulty_work(s)
    assert all(f.calls.get(t, 0) for t in TARGETS if t != "fsync_after_replace"), f.calls
    f.calls["fsync_after_replace"] = 1
    return f.calls


def fault_case(path: Path, target: str, nth: int, err: int) -> str:
    """Inject one fault; check the error, the store, the same handle and the next writer."""
    prepare(path)
    h.count("faults")
    s = actstore.open(path, mode="a")
    with injected(Fault(target, nth, err)) as fault:
        try:
            faulty_work(s)
        except OSError as e:
            assert e.errno == err, f"the error lost its errno: {e!r}"
            outcome = "raised"
        else:
            outcome = "no error"
    assert fault.fired, f"{target} #{nth} was never reached"
    assert outcome == "raised", f"{target} #{nth} failed with {os.strerror(err)} but the caller saw no error"
    # The last commit is intact for other readers (or the faulty one, if its rename happened).
    on_disk = h.check_store(path, {BASE, WORK[-1][1]})
    # The handle agrees with the disk about what is committed.
    assert len(s) == on_disk, f"the handle shows {len(s)} rows, the disk holds {on_disk}"
    assert s.pending == 0
    # The same handle continues.
    h.append_range(s, 0, 120)
    s.set_view("order", np.arange(120))
    s.commit()
    s.close()
    h.check_store(path, {120})
    # The next writer continues, and nothing uncommitted is left behind.
    with actstore.open(path, mode="a") as s2:
        assert not h.leftovers(str(path)), h.leftovers(str(path))
        h.append_range(s2, 0, 140)
    h.check_store(path, {140})
    h.count("faults_survived")
    return outcome


QUICK = [(t, errno.ENOSPC if i % 2 else errno.EIO) for i, t in enumerate(TARGETS)]


@pytest.mark.parametrize("target,err", QUICK, ids=[f"{t}-{errno.errorcode[e]}" for t, e in QUICK])
def test_fault_once(tmp_path: Path, call_counts: dict[str, int], target: str, err: int) -> None:
    nth = max(1, call_counts[target] // 2)
    fault_case(tmp_path / "s", target, nth, err)


@pytest.mark.slow
def test_fault_every_call(tmp_path: Path, call_counts: dict[str, int]) -> None:
    """Every call of every target, failing in turn (at most 20 calls a target, evenly spread)."""
    rng = random.Random(3)
    for target in TARGETS:
        calls = call_counts[target]
        for nth in sorted({1 + i * calls // 20 for i in range(min(calls, 20))}):
            err = rng.choice([errno.ENOSPC, errno.EIO])
            case = tmp_path / f"{target}-{nth}"
            try:
                fault_case(case / "s", target, nth, err)
            except BaseException as e:
                raise AssertionError(f"{target} call {nth} failing with {errno.errorcode[err]}: {e}") from e
            shutil.rmtree(case)


def test_failed_commit_after_rename_keeps_the_segment(tmp_path: Path) -> None:
    """Regression: an error after the manifest rename (the directory fsync) deleted the
    segment that the new, visible manifest references, corrupting the store."""
    path = tmp_path / "s"
    prepare(path)
    s = actstore.open(path, mode="a")
    with injected(Fault("fsync_after_replace", 1, errno.EIO)), pytest.raises(OSError):
        faulty_work(s)
    n = h.check_store(path, {BASE, WORK[-1][1]})
    assert n == WORK[-1][1]  # the rename happened: the commit is visible (not known to be durable)
    assert len(s) == n and s.generation == actstore.open(path).generation
    s.close()


def test_view_of_dropped_rows_is_refused(tmp_path: Path) -> None:
    """Regression: a view set over pending rows that a failed append then dropped was
    committed anyway, naming rows that do not exist (verify failed afterwards)."""
    path = tmp_path / "s"
    prepare(path)
    s = actstore.open(path, mode="a")
    h.append_range(s, BASE, BASE + 10)
    s.set_view("order", np.arange(BASE + 10))
    with injected(Fault("shard_write", 1, errno.ENOSPC)), pytest.raises(OSError):
        h.append_range(s, BASE + 10, BASE + 20)
    assert s.pending == 0
    with pytest.raises(ValueError, match="order"):
        s.commit()
    h.check_store(path, {BASE})
    h.append_range(s, 0, BASE + 20)
    s.set_view("order", np.arange(BASE + 20))
    s.commit()
    s.close()
    h.check_store(path, {BASE + 20})


# --- a real full disk ----------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); faults are injected by patching instead")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_on_tmpfs(small_tmpfs: Path) -> None:
    path = small_tmpfs / "s"
    prepare(path)
    ballast = small_tmpfs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:  # fill the disk...
            os.write(fd, b"\xff" * 4096)
    os.ftruncate(fd, max(0, os.fstat(fd).st_size - 24 * 4096))  # ...but for ~96 KiB
    os.close(fd)
    s = actstore.open(path, mode="a")
    h.count("faults")
    with pytest.raises(OSError) as info:
        h.append_range(s, 0, 3000)
        s.commit()
    assert info.value.errno == errno.ENOSPC
    assert h.check_store(path, {BASE}) == BASE
    assert len(s) == BASE
    os.unlink(ballast)  # space comes back; the same handle goes on
    h.append_range(s, 0, 3000)
    s.commit()
    s.close()
    h.check_store(path, {3000})
    h.count("faults_survived")
