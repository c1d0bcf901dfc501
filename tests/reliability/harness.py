"""Machinery shared by the reliability suite.

* Deterministic data: row ``i`` has key :func:`key_of` ``(i)`` and values that
  are a pure function of ``i`` (:func:`expected`), so any store can be checked
  against what a clean run computes, whatever crashed in between.
* :func:`check_store`: open, ``verify``, and compare every row, key and lookup.
* Child processes (started through a fork server that has imported actstore
  once, so that a child starts in milliseconds, not seconds):
  :func:`writer_child` (append/commit loops that can pause at a chosen call of a
  chosen function, so the parent kills exactly there), :func:`powerloss_child`
  (the same loop, journalling every write, fsync, mkdir and rename, and cutting
  itself off at a chosen operation) and :func:`reader_child` (concurrent reads).
* :func:`power_loss_image`: rebuild the directory a power cut would leave from
  such a journal.

Everything in this module must stay importable by a bare child process: it
depends on actstore, numpy and blake3 only.
"""

from __future__ import annotations

import atexit
import builtins
import collections
import functools
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import blake3
import numpy as np
import torch

import actstore
from actstore import Field
from actstore.format.quantize import SCHEMES, dequantize, quantize

FIELDS = {"h": Field((24,), "float32"), "tok": Field((None, 4), "float16"), "lab": Field((), "int64"),
          "q": Field((None, 4), "float16", quantize="int8")}  # int8 codes + a scale per token (FORMAT.md §4.1)
#: Small inner chunks, so shards hold several of them and the shard index is non-trivial.
CHUNK_BYTES = 2048
INITIAL_ROWS = 60

#: What the suite tried and what survived, summed over the session (see conftest.py).
STATS: collections.Counter[str] = collections.Counter()


def count(name: str, n: int = 1) -> None:
    STATS[name] += n


# --- deterministic data ------------------------------------------------------------


def key_of(i: int) -> bytes:
    return blake3.blake3(b"actstore-reliability-row-%d" % i).digest()


@functools.cache
def _row(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([20261127, i])
    h = rng.standard_normal(24).astype(np.float32)
    tok = rng.standard_normal(((i * 7) % 6, 4)).astype(np.float16)  # 0..5 tokens; some rows empty
    return h, tok


def keys_array(lo: int, hi: int) -> np.ndarray:
    return np.frombuffer(b"".join(key_of(i) for i in range(lo, hi)), np.uint8).reshape(-1, 32)


def batch(lo: int, hi: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Keys and values of rows ``lo..hi-1``, ready for ``append``."""
    rows = [_row(i) for i in range(lo, hi)]
    values = {
        "h": np.stack([r[0] for r in rows]) if rows else np.empty((0, 24), np.float32),
        "tok": [r[1] for r in rows],
        "lab": np.arange(lo, hi, dtype=np.int64),
        "q": [r[1].astype(np.float32) * 3 for r in rows],
    }
    return keys_array(lo, hi), values


@functools.cache
def _q_row(i: int) -> np.ndarray:
    """Row ``i`` of field ``q`` as a clean store reads it (quantised, then dequantised into float16)."""
    x = torch.from_numpy(_row(i)[1].astype(np.float32) * 3)
    codes, scales = quantize(x, SCHEMES["int8"], "q")
    return dequantize(codes, scales, SCHEMES["int8"], torch.empty(x.shape, dtype=torch.float16)).numpy()


def append_range(store: actstore.ActivationStore, lo: int, hi: int, step: int = 37) -> int:
    new = 0
    for a in range(lo, hi, step):
        k, v = batch(a, min(hi, a + step))
        new += store.append(k, v)
    return new


class StoreMismatch(AssertionError):
    pass


def assert_rows(store: actstore.ActivationStore, n: int, *, allow_missing_fields: bool = False) -> None:
    """The store holds exactly rows ``0..n-1`` with the values a clean run computes.

    ``allow_missing_fields``: a (fuzzed) manifest may list fewer fields; those it
    lists must still hold exactly the right values.
    """
    if len(store) != n:
        raise StoreMismatch(f"{len(store)} rows, expected {n}")
    changed = [f for f in store.fields if FIELDS.get(f) != store.fields[f]]
    missing = [f for f in FIELDS if f not in store.fields]
    if changed or (missing and not allow_missing_fields):
        raise StoreMismatch(f"fields differ: {dict(store.fields)}")
    if n == 0:
        return
    idx = np.arange(n)
    got = store.gather(idx)
    if not np.array_equal(store.key_at(idx), keys_array(0, n)):
        raise StoreMismatch("keys differ from the deterministic keys")
    if "lab" in got and not np.array_equal(got["lab"].numpy(), idx):
        bad = int(np.nonzero(got["lab"].numpy() != idx)[0][0])
        raise StoreMismatch(f"row {bad} holds lab {got['lab'][bad]}")
    if "h" in got:
        want_h = np.stack([_row(i)[0] for i in range(n)])
        if not np.array_equal(got["h"].numpy().view(np.uint32), want_h.view(np.uint32)):
            raise StoreMismatch("field h differs")
    if "tok" in got:
        rb = got["tok"]
        want_len = np.array([len(_row(i)[1]) for i in range(n)])
        if not np.array_equal(rb.lengths.numpy(), want_len):
            raise StoreMismatch("field tok has wrong lengths")
        want_tok = np.concatenate([_row(i)[1] for i in range(n)])
        if not np.array_equal(rb.values.numpy().view(np.uint16), want_tok.view(np.uint16)):
            raise StoreMismatch("field tok differs")
    if "q" in got:
        qb = got["q"]
        want_q = np.concatenate([_q_row(i) for i in range(n)])
        if not np.array_equal(qb.lengths.numpy(), [len(_q_row(i)) for i in range(n)]) or \
                not np.array_equal(qb.values.numpy().view(np.uint16), want_q.view(np.uint16)):
            raise StoreMismatch("field q differs")
    look = store.lookup(keys_array(0, n + 5))
    if not np.array_equal(look, np.concatenate([idx, np.full(5, -1)])):
        raise StoreMismatch("lookup does not find every key at its row")
    for i in {0, n // 2, n - 1}:  # the single-row paths
        row, by_key = store[i], store.get(key_of(i))
        if "lab" in row and (int(row["lab"]) != i or int(by_key["lab"]) != i):
            raise StoreMismatch(f"store[{i}] / get(key_of({i})) differ")
        if "h" in row and not np.array_equal(row["h"].numpy(), _row(i)[0]):
            raise StoreMismatch(f"store[{i}] differs")
        if "tok" in row and not np.array_equal(by_key["tok"].numpy().view(np.uint16), _row(i)[1].view(np.uint16)):
            raise StoreMismatch(f"get(key_of({i})) differs")
        if "q" in row and not np.array_equal(row["q"].numpy().view(np.uint16), _q_row(i).view(np.uint16)):
            raise StoreMismatch(f"store[{i}] field q differs")


def check_store(path: str | os.PathLike[str], allowed: Iterable[int] | None = None, *, verify: bool = True) -> int:
    """Open, verify and compare the store at ``path``; returns its row count."""
    with actstore.open(path) as s:
        if verify:
            s.verify()
        n = len(s)
        if allowed is not None and n not in set(allowed):
            raise StoreMismatch(f"{n} rows: not the row count of a commit that could have happened {sorted(set(allowed))}")
        assert_rows(s, n)
    return n


_TEMPLATES: dict[Any, str] = {}


def from_template(path: str | os.PathLike[str], key: Any, build: Callable[[str], None]) -> None:
    """Copy a store built once per process by ``build`` (much cheaper than fsyncing a new one each time)."""
    tpl = _TEMPLATES.get(key)
    if tpl is None or not os.path.isdir(tpl):
        tpl = _TEMPLATES[key] = os.path.join(tempfile.mkdtemp(prefix="actstore-template-"), "s")
        atexit.register(shutil.rmtree, os.path.dirname(tpl), True)
        build(tpl)
    shutil.copytree(tpl, path)


def _build_store(path: str, rows: int) -> None:
    with actstore.create(path, FIELDS, chunk_bytes=CHUNK_BYTES) as s:
        append_range(s, 0, rows)
        s.set_view("order", np.arange(rows))


def make_store(path: str | os.PathLike[str], rows: int = INITIAL_ROWS) -> None:
    """A store of rows ``0..rows-1`` and the view "order", committed."""
    from_template(path, ("store", rows), functools.partial(_build_store, rows=rows))


def referenced_ids(path: str) -> set[str]:
    m = actstore.open(path).manifest
    return {s.id for s in m.segments} | {r.id for r in m.indexes} | {v.id for v in m.views.values()}


def leftovers(path: str) -> list[str]:
    """Objects in the store directories that the manifest does not reference."""
    keep = referenced_ids(path)
    out = []
    for sub in ("segments", "indexes", "views"):
        for name in os.listdir(os.path.join(path, sub)):
            if name != "zarr.json" and name not in keep:
                out.append(f"{sub}/{name}")
    return out


def resume_and_check(path: str, total: int) -> None:
    """What a restarted job does: reopen, append everything again, commit."""
    with actstore.open(path, mode="a") as s:
        if leftovers(path):
            raise StoreMismatch(f"open(mode='a') left uncommitted objects behind: {leftovers(path)}")
        before = len(s)
        new = append_range(s, 0, total)
        if new != total - before:
            raise StoreMismatch(f"append found {new} new rows, expected {total - before}")
        s.set_view("order", np.arange(total))
        s.commit()
    n = check_store(path, {total})
    with actstore.open(path) as s:
        if not np.array_equal(s.view("order"), np.arange(n)):
            raise StoreMismatch("view 'order' differs")


# --- child processes ------------------------------------------------------------------

_CTX: Any = None


def context() -> Any:
    """A fork-server multiprocessing context whose server has imported actstore."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["actstore", "actstore.store", __name__])
    return _CTX


def start(target: Callable[..., Any], *args: Any) -> Any:
    p = context().Process(target=target, args=args)  # (not daemonic: precompute's DataLoader workers are its children)
    p.start()
    return p


class Log:
    """Append-only line log shared with the parent (survives SIGKILL: no buffering)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def read_log(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_for(path: str, prefixes: Sequence[str], proc: Any, timeout: float = 60.0) -> str | None:
    """Wait until a line of the log starts with one of ``prefixes`` (or the child ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in read_log(path):
            if line.startswith(tuple(prefixes)):
                return line
        if not proc.is_alive():
            for line in read_log(path):
                if line.startswith(tuple(prefixes)):
                    return line
            return None
        time.sleep(0.002)
    raise TimeoutError(f"child did not log any of {prefixes} within {timeout} s: {read_log(path)[-5:]}")


def kill(proc: Any) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)


# A plan is a list of commits; a commit is (list of (lo, hi) appends, set a view?).
Plan = list[tuple[list[tuple[int, int]], bool]]


def make_plan(start_row: int, commits: int, rows_per_commit: int, appends: int = 2) -> Plan:
    plan: Plan = []
    lo = start_row
    for c in range(commits):
        hi = lo + rows_per_commit
        cuts = np.linspace(lo, hi, appends + 1).astype(int).tolist()
        plan.append(([(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)], c % 3 == 2))
        lo = hi
    return plan


def plan_total(plan: Plan) -> int:
    return plan[-1][0][-1][1]


def run_plan(store: actstore.ActivationStore, plan: Plan, log: Log) -> None:
    for appends, view in plan:
        for lo, hi in appends:
            append_range(store, lo, hi)
        hi = appends[-1][1]
        if view:
            store.set_view("order", np.arange(len(store) + store.pending))
        log(f"committing {hi}")
        store.commit()
        log(f"committed {hi}")


def allowed_counts(lines: Sequence[str], initial: int) -> tuple[int, set[int]]:
    """(rows of the last commit that returned, every row count the store may hold)."""
    last, inflight = initial, None
    for line in lines:
        word, _, n = line.partition(" ")
        if word == "committing":
            inflight = int(n)
        elif word == "committed":
            last, inflight = int(n), None
    return last, {last} | ({inflight} if inflight is not None else set())


#: Where a writer child can be paused: name -> (object, attribute).
def _pause_targets() -> dict[str, tuple[Any, str]]:
    import actstore.engine.commit as commit_mod
    import actstore.engine.write.segments as writer_mod
    import actstore.storage.files as files_mod

    return {
        "append": (writer_mod.ShardFile, "write"),  # buffering rows into shard files
        "finish": (writer_mod.ShardFile, "finish"),  # padding, shard index, fsync
        "write_durable": (files_mod, "write_durable"),  # metadata documents and the manifest temp file
        "fsync": (os, "fsync"),  # every fsync, files and directories
        "fsync_dir": (files_mod, "fsync_dir"),
        "mkdir": (os, "mkdir"),
        "index_run": (commit_mod, "write_index_run"),
        "replace": (os, "replace"),  # the commit point
        "rmtree": (shutil, "rmtree"),  # deleting superseded index runs and views
    }


PAUSE_TARGETS = tuple(_pause_targets())


def _install_counters(log: Log, pause: tuple[str, int, str] | None) -> dict[str, int]:
    counts = dict.fromkeys(PAUSE_TARGETS, 0)

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            n = counts[name]
            if pause and pause[0] == name and pause[1] == n and pause[2] == "before":
                log(f"PAUSED {name} {n} before")
                time.sleep(600)
            out = original(*args, **kwargs)
            if pause and pause[0] == name and pause[1] == n and pause[2] == "after":
                log(f"PAUSED {name} {n} after")
                time.sleep(600)
            return out

        return wrapper

    for name, (obj, attr) in _pause_targets().items():
        setattr(obj, attr, wrap(name, getattr(obj, attr)))
    return counts


def writer_child(path: str, log_path: str, plan: Plan, pause: tuple[str, int, str] | None) -> None:
    """Run ``plan`` against the store; log progress; optionally pause at one call."""
    log = Log(log_path)
    counts = _install_counters(log, pause)
    store = actstore.open(path, mode="a")
    log("opened")
    run_plan(store, plan, log)
    store.close()
    log("COUNTS " + json.dumps(counts))
    log("done")


# --- precompute children ------------------------------------------------------------------


def precompute_child(path: str, log_path: str, n: int, batch_size: int, commit_every: int,
                     pause: tuple[str, int, str] | None, num_workers: int = 0) -> None:
    from . import precompute_case

    # A fork-server child inherits "forkserver" as its default start method; a real job's
    # DataLoader workers are forked from it (and so inherit its open files).
    multiprocessing.set_start_method("fork", force=True)
    log = Log(log_path)
    counts = _install_counters(log, pause)
    log("opened")
    precompute_case.run(path, n, batch_size, commit_every, log, num_workers=num_workers)
    log("COUNTS " + json.dumps(counts))
    log("done")


# --- simulated power loss ---------------------------------------------------------------


def powerloss_child(path: str, log_path: str, journal_path: str, saved_dir: str, plan: Plan, cut_at: int | None,
                    mutate: str | None = None) -> None:
    """Run ``plan`` while journalling every durability-relevant operation.

    The operation numbered ``cut_at`` (1-based) is never performed: the process
    kills itself just before it, as a power cut would stop it.  With ``cut_at``
    None the child runs to the end and logs how many operations there were.
    """
    import actstore.engine.write.segments as writer_mod
    import actstore.storage.files as files_mod
    import actstore.storage.local as local_mod

    log = Log(log_path)
    jfd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    real = {"open": builtins.open, "os_open": os.open, "fsync": os.fsync, "mkdir": os.mkdir,
            "replace": os.replace, "unlink": os.unlink, "rmtree": shutil.rmtree}
    fd_path: dict[int, str] = {}
    ops = [0]

    def op(entry: list[Any], action: Callable[[], Any]) -> Any:
        ops[0] += 1
        if cut_at is not None and ops[0] == cut_at:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        out = action()
        os.write(jfd, (json.dumps(entry) + "\n").encode())
        return out

    def jopen(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            p = os.path.abspath(file)
            existed = os.path.exists(p)
            f = op(["open_w", p, existed], lambda: real["open"](file, mode, *args, **kwargs))
            fd_path[f.fileno()] = p
            return f
        return real["open"](file, mode, *args, **kwargs)

    def jos_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        p = os.path.abspath(file)
        if flags & os.O_CREAT:
            existed = os.path.exists(p)
            fd = op(["open_w", p, existed], lambda: real["os_open"](file, flags, *args, **kwargs))
        else:
            fd = real["os_open"](file, flags, *args, **kwargs)
        fd_path[fd] = p
        return fd

    def jfsync(fd: int) -> None:
        p = fd_path.get(fd, "?")
        st = os.fstat(fd)
        isdir = os.path.isdir(p) if p != "?" else False
        op(["fsync", p, st.st_size, isdir], lambda: real["fsync"](fd))

    def jmkdir(p: Any, *args: Any, **kwargs: Any) -> None:
        op(["mkdir", os.path.abspath(p)], lambda: real["mkdir"](p, *args, **kwargs))

    def jreplace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        s, d = os.path.abspath(src), os.path.abspath(dst)
        saved = None
        if os.path.isfile(d):
            saved = os.path.join(saved_dir, f"{ops[0] + 1}.saved")
            shutil.copyfile(d, saved)
        op(["replace", s, d, saved], lambda: real["replace"](src, dst, *args, **kwargs))

    def junlink(p: Any, *args: Any, **kwargs: Any) -> None:
        op(["delete", os.path.abspath(p)], lambda: real["unlink"](p, *args, **kwargs))

    def jrmtree(p: Any, *args: Any, **kwargs: Any) -> None:
        op(["delete", os.path.abspath(p)], lambda: real["rmtree"](p, *args, **kwargs))

    if mutate == "no_root_dir_fsync":  # a broken writer, to show that the model catches it
        real_fsync_dir = files_mod.fsync_dir
        files_mod.fsync_dir = lambda d: None if os.path.abspath(d) == os.path.abspath(path) else real_fsync_dir(d)
    elif mutate == "no_file_fsync":
        real_fsync_file = jfsync

        def jfsync(fd: int) -> None:  # noqa: F811 - the broken variant
            if fd_path.get(fd) and os.path.isdir(fd_path[fd]):
                real_fsync_file(fd)

    writer_mod.open = jopen  # type: ignore[attr-defined]  # shadows the builtin inside the writing modules only
    files_mod.open = jopen  # type: ignore[attr-defined]
    local_mod.open = jopen  # type: ignore[attr-defined]  # (copies made by link_object)
    os.open, os.fsync, os.mkdir, os.replace, os.unlink = jos_open, jfsync, jmkdir, jreplace, junlink  # type: ignore[assignment]
    shutil.rmtree = jrmtree  # type: ignore[assignment]
    store = actstore.open(path, mode="a")
    log("opened")
    run_plan(store, plan, log)
    store.close()
    log(f"OPS {ops[0]}")
    log("done")


def power_loss_image(store: str, image: str, journal_path: str) -> dict[str, int]:
    """Copy ``store`` to ``image`` as a power cut after the journalled operations would leave it.

    The model (ext4-like, pessimistic): a file's data survive up to the size it
    had at its last ``fsync`` (nothing if never fsynced); a directory entry made
    (create, mkdir, rename) after its directory's last ``fsync`` is undone (a
    rename puts back the file it replaced).  Deletions are kept (they only ever
    remove files no commit needs, and keeping them is the harsher choice).
    """
    durable: dict[str, int] = {}
    touched: set[str] = set()
    pending: dict[str, list[tuple[str, str, str | None]]] = {}
    stats = {"ops": 0, "truncated": 0, "undone": 0}
    with open(journal_path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    for e in entries:
        stats["ops"] += 1
        kind = e[0]
        if kind == "open_w":
            p, existed = e[1], e[2]
            if not existed:  # (the writer never rewrites a file in place; the lock file does not matter)
                touched.add(p)
                durable[p] = 0
                pending.setdefault(os.path.dirname(p), []).append(("new", os.path.basename(p), None))
        elif kind == "mkdir":
            pending.setdefault(os.path.dirname(e[1]), []).append(("new", os.path.basename(e[1]), None))
        elif kind == "fsync":
            p, size, isdir = e[1], e[2], e[3]
            if isdir:
                pending[p] = []
            else:
                durable[p] = size
        elif kind == "replace":
            src, dst, saved = e[1], e[2], e[3]
            durable[dst] = durable.pop(src, 0)
            touched.add(dst)
            touched.discard(src)
            pending.setdefault(os.path.dirname(dst), []).append(("replaced", os.path.basename(dst), saved))
    shutil.copytree(store, image, symlinks=True)

    def img(p: str) -> str:
        return os.path.join(image, os.path.relpath(p, store))

    for p in touched:
        q = img(p)
        if os.path.isfile(q) and os.path.getsize(q) > durable.get(p, 0):
            os.truncate(q, durable.get(p, 0))
            stats["truncated"] += 1
    for d, undo in pending.items():
        for kind, name, saved in reversed(undo):
            q = os.path.join(img(d), name)
            if kind == "new" or saved is None:
                if os.path.isdir(q) and not os.path.islink(q):
                    shutil.rmtree(q)
                    stats["undone"] += 1
                elif os.path.lexists(q):
                    os.unlink(q)
                    stats["undone"] += 1
            else:
                shutil.copyfile(saved, q)
                stats["undone"] += 1
    return stats


# --- concurrent readers -----------------------------------------------------------------


def reader_child(path: str, out_path: str, counts: list[int], duration: float, seed: int, reopen_every: int,
                 stop_path: str | None = None) -> None:
    """Read while a writer works (until ``stop_path`` exists, or ``duration`` s); report what was checked."""
    rng = random.Random(seed)
    allowed = set(counts)
    report: dict[str, Any] = {"iterations": 0, "refreshes": 0, "opens": 0, "rows_checked": 0, "errors": [],
                              "seen": []}
    held: list[tuple[int, Any]] = []  # (row, tensor) views kept across refreshes
    deadline = time.monotonic() + duration
    store = None
    last = -1
    try:
        while time.monotonic() < deadline and not (stop_path and os.path.exists(stop_path)):
            i = report["iterations"]
            if store is None or (reopen_every and i % reopen_every == 0):
                if store is not None:
                    store.close()
                store = actstore.open(path)
                report["opens"] += 1
            elif store.refresh():
                report["refreshes"] += 1
            n = len(store)
            if n not in allowed:
                raise StoreMismatch(f"saw {n} rows, not the row count of any commit")
            if n < last:
                raise StoreMismatch(f"row count went back from {last} to {n}")
            if n != last:
                report["seen"].append(n)
            last = n
            if n:
                rows = sorted({rng.randrange(n) for _ in range(8)})
                got = store.gather(np.array(rows))
                for j, r in enumerate(rows):
                    h, tok = _row(r)
                    if int(got["lab"][j]) != r or not np.array_equal(got["h"][j].numpy(), h):
                        raise StoreMismatch(f"row {r} holds wrong values")
                    if not np.array_equal(got["tok"][j].numpy().view(np.uint16), tok.view(np.uint16)):
                        raise StoreMismatch(f"row {r} holds wrong tokens")
                look = store.lookup([key_of(r) for r in rows] + [key_of(n)])
                if look[:-1].tolist() != rows or look[-1] != -1:
                    raise StoreMismatch(f"lookup gave {look.tolist()} for rows {rows} + one absent key")
                if "order" in store.views:
                    v = store.view("order")
                    if len(v) > n or not np.array_equal(v, np.arange(len(v))):
                        raise StoreMismatch("view 'order' is wrong")
                r = rows[0]
                held.append((r, store[r]["h"]))
                held = held[-50:]
                report["rows_checked"] += len(rows)
            report["iterations"] += 1
        for r, t in held:  # views taken from old snapshots stay valid after cleanup
            if not np.array_equal(t.numpy(), _row(r)[0]):
                raise StoreMismatch(f"a tensor of row {r} held across commits changed")
    except Exception as e:  # reported to the parent, which fails the test
        report["errors"].append(f"{type(e).__name__}: {e}")
    with open(out_path, "w") as f:
        json.dump(report, f)


def read_outcome(path: str, n: int, verify_reads: bool, out: str) -> None:
    """Child: open and read everything; record what happened."""
    result: dict[str, Any] = {}
    try:
        with actstore.open(path, verify_reads=verify_reads) as s:
            assert_rows(s, n)
            if not np.array_equal(s.view("order"), np.arange(n)):
                raise StoreMismatch("view 'order' differs")
        result["outcome"] = "exact"
    except StoreMismatch as e:
        result["outcome"], result["detail"] = "wrong values", str(e)
    except actstore.StoreError as e:
        result["outcome"], result["detail"] = "raised", f"{type(e).__name__}: {e}"
    except Exception as e:
        result["outcome"], result["detail"] = "other error", f"{type(e).__name__}: {e}"
    with open(out, "w") as f:
        json.dump(result, f)


def writer_loop(path: str, log_path: str, plan: Plan, pause_between: float) -> None:
    log = Log(log_path)
    with actstore.open(path, mode="a") as s:
        log("opened")
        for appends, _ in plan:
            for lo, hi in appends:
                append_range(s, lo, hi)
            s.set_view("order", np.arange(len(s) + s.pending))  # every commit replaces the view
            s.commit()
            log(f"committed {appends[-1][1]}")
            time.sleep(pause_between)
    log("done")


def hold_lock(path: str, log_path: str) -> None:
    log = Log(log_path)
    s = actstore.open(path, mode="a")
    append_range(s, INITIAL_ROWS, INITIAL_ROWS + 10)  # pending, never committed
    log(f"holding {os.getpid()}")
    time.sleep(600)


def try_write(path: str, out: str) -> None:
    try:
        with actstore.open(path, mode="a") as s:
            append_range(s, 0, 5)
        result = {"ok": True}
    except actstore.StoreLockedError as e:
        result = {"ok": False, "error": str(e), "blocking": isinstance(e, BlockingIOError)}
    with open(out, "w") as f:
        json.dump(result, f)




def hold_lock_with_forked_child(path: str, log_path: str) -> None:
    """A writer that forked a child (as a DataLoader with workers does), then waits to be killed."""
    log = Log(log_path)
    s = actstore.open(path, mode="a")
    append_range(s, INITIAL_ROWS, INITIAL_ROWS + 10)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # (fork's after-in-child hooks have run by the time fork returns here)
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)  # the child is running: report only then, so the test never races its start
    log(f"holding {os.getpid()} {pid}")
    time.sleep(600)
