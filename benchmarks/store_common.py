"""Shared by the store benchmark's tables: the data's shape, keys and rows, interleaved timing, the report."""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import Table, back_free_pages

__all__ = ["APPEND_BATCH", "BATCH", "COLUMNS", "DIM", "DTYPE", "ROW_BYTES", "SEED", "SEGMENTS", "SMALL_ROWS",
           "CLOCK", "Report", "bench_many_commits", "fmt_ratio", "make_keys", "make_rows", "package_keys", "race", "race_rounds",
           "step", "use_cpu_clock"]

DIM = 384
DTYPE = np.float16
ROW_BYTES = DIM * np.dtype(DTYPE).itemsize
SEED = 0
BATCH = 256  # rows per random gather
SEGMENTS = 20  # commits of the multi-segment store
SMALL_ROWS = 10_000  # the small store of the open test
APPEND_BATCH = 4096
COLUMNS = ["what", "actstore", "peer", "ratio", "target", "result"]

package_keys: Callable[[list[str]], np.ndarray] | None
try:
    from actstore.format.keys import keys as package_keys
except ImportError:  # pragma: no cover - the package without its keys module
    package_keys = None


# --- helpers -----------------------------------------------------------------------


def make_keys(start: int, stop: int) -> np.ndarray:
    """Keys of rows ``start..stop`` as an (n, 32) uint8 array."""
    if package_keys is not None:
        return package_keys([str(i) for i in range(start, stop)])
    import blake3

    buf = b"".join(blake3.blake3(str(i).encode()).digest() for i in range(start, stop))
    return np.frombuffer(buf, np.uint8).reshape(-1, 32).copy()


def make_rows(n: int, seed: int) -> np.ndarray:
    """``n`` random float16 rows: random bit patterns with exponent bit 14 cleared (finite, |x| < 2).

    Random bits are about 5× faster to make than ``standard_normal`` + cast on the
    2-core machine, and the values do not matter to any benchmark here.
    """
    rng = np.random.default_rng(seed)
    words = rng.integers(-(2**63), 2**63, size=n * DIM * 2 // 8, dtype=np.int64)
    bits = words.view(np.uint16)
    bits &= np.uint16(0xBFFF)
    return bits.view(DTYPE).reshape(n, DIM)


#: The clock of :func:`race` and :func:`race_rounds`: wall time by default; ``--clock cpu`` (:func:`use_cpu_clock`)
#: counts this thread's CPU time only (user + system, page faults included), which a machine shared with other
#: busy processes does not inflate by descheduling (it does not remove their effect on caches).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def use_cpu_clock() -> None:
    CLOCK[0] = time.thread_time


def _per_call(fn: Callable[[], Any], number: int) -> float:
    clock = CLOCK[0]
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def race(fns: dict[str, Callable[[], Any]], numbers: dict[str, int], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round, their order rotating
    from round to round: no function always runs first after the others (a peer that reads hundreds of MB evicts
    the CPU caches for whoever runs next) or always right after another that read the same rows (warm caches)."""
    for fn in fns.values():
        fn()  # warm-up
    return {k: statistics.median(v) for k, v in race_rounds(fns, numbers, rounds).items()}


def race_rounds(fns: dict[str, Callable[[], Any]], number: int | dict[str, int], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function in each round (``number`` calls a round, or per function): no warm-up
    (round 1 is each function's first use), the functions taking turns, their order rotating from round to round."""
    names = list(fns)
    numbers = number if isinstance(number, dict) else dict.fromkeys(names, number)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_per_call(fns[name], numbers[name]))
    return times


def fmt_ratio(r: float) -> str:
    return f"{r:.3g}×" if r < 1000 else f"{r:,.0f}×"


def step(msg: str) -> Callable[[], None]:
    """Print what is being prepared; the returned function prints how long it took."""
    t0 = time.perf_counter()
    print(f"# {msg} …", end="", file=sys.stderr, flush=True)
    return lambda: print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


class Report:
    """The tables of one run, as Markdown and as JSON records."""

    def __init__(self) -> None:
        self.tables: list[Table] = []
        self.records: list[dict[str, Any]] = []
        self.notes: dict[str, list[str]] = {}

    def table(self, title: str) -> Table:
        t = Table(title, COLUMNS)
        self.tables.append(t)
        self.notes[title] = []
        return t

    def row(self, t: Table, what: str, ours: float, peer: float, unit: str, *, higher_is_better: bool,
            target: str, passed: bool | None) -> None:
        """Add a row; ``ours``/``peer`` in ``unit``, ratio as actstore speed ÷ peer speed (``passed``
        None: a measurement without a target)."""
        ratio = ours / peer if higher_is_better else peer / ours
        t.add(what, f"{_num(ours)} {unit}", f"{_num(peer)} {unit}", fmt_ratio(ratio), target,
              "—" if passed is None else "PASS" if passed else "**FAIL**")
        self.records.append({"table": t.title, "what": what, "actstore": ours, "peer": peer, "unit": unit,
                             "ratio": ratio, "target": target, "pass": passed})

    def note(self, t: Table, text: str) -> None:
        self.notes[t.title].append(text)

    def markdown_of(self, t: Table) -> str:
        notes = self.notes[t.title]
        return t.markdown() + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _num(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


# --- many commits: automatic merging and compaction ---------------------------------------------

COMMITS = 64  # a one-hour precompute at the default commit every 60 s


def _write(path: str, keys: np.ndarray, rows: np.ndarray, commits: int, policy: Any) -> None:
    import actstore

    per = -(-len(rows) // commits)
    with actstore.create(path, {"h": actstore.Field((DIM,), "float16")}) as s:
        s.merge_policy = policy
        for c in range(commits):
            s.append(keys[c * per : (c + 1) * per], {"h": rows[c * per : (c + 1) * per]})
            s.commit()


def _copy_rate(src: str, dst: str) -> float:
    """Seconds to copy ``src`` to ``dst`` sequentially and fsync it (the machine's sequential copy)."""
    t0 = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def bench_many_commits(rep: Report, out: str, rows: np.ndarray, keys: np.ndarray, rounds: int) -> None:
    """A store written in 64 commits: its gathers before and after the automatic merge, and compaction speed."""
    import torch

    import actstore

    n = len(rows)
    t = rep.table(f"A store written in {COMMITS} commits ({n:,} rows × {DIM} float16, {BATCH} random rows a gather)")
    paths = {k: os.path.join(out, f"commits-{k}") for k in ("one", "raw", "merged", "compacted")}
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    done = step(f"{COMMITS}-commit stores, with and without the automatic merge, and compacted")
    _write(paths["one"], keys, rows, 1, None)
    _write(paths["raw"], keys, rows, COMMITS, None)
    _write(paths["merged"], keys, rows, COMMITS, actstore.TieredMerge())
    shutil.copytree(paths["raw"], paths["compacted"])
    with actstore.open(paths["compacted"], mode="a") as w:
        w.compact()
    done()
    rng = np.random.default_rng(21)
    batches = [rng.choice(n, BATCH, replace=False).astype(np.int64) for _ in range(64)]
    npy = os.path.join(out, "commits.npy")
    np.save(npy, rows)
    # No warm-up: every store is opened (and its files mapped) just before the first round, so round 1 is the
    # first pass after open; the order of the stores rotates from round to round.
    stores = {k: actstore.open(p) for k, p in paths.items()}
    mm = np.load(npy, mmap_mode="r").view(np.ndarray)  # the plain array of the map: the strongest peer
    cyc = {k: iter(range(10**9)) for k in (*stores, "take")}
    fns: dict[str, Callable[[], Any]] = {k: (lambda s=s, k=k: s.gather(batches[next(cyc[k]) % 64])["h"])
                                         for k, s in stores.items()}
    fns["take"] = lambda: torch.from_numpy(np.take(mm, batches[next(cyc["take"]) % 64], axis=0))
    want = torch.from_numpy(mm[batches[0]])
    for k, s in stores.items():
        if not torch.equal(s.gather(batches[0])["h"], want):
            raise SystemExit(f"{k}: gather returned other rows than numpy")
    calls = max(200, 1500 * n // 1_000_000)
    per_round = race_rounds(fns, calls, max(rounds, 5))
    rps = {k: BATCH / statistics.median(v) for k, v in per_round.items()}
    segs = {k: len(s.manifest.segments) for k, s in stores.items()}

    def spread(k: str) -> str:
        r = [b / a for a, b in zip(per_round[k], per_round["one"], strict=True)]
        return f"rounds {', '.join(f'{x:.2f}' for x in r)} (first after open {r[0]:.2f})"

    rep.row(t, f"{COMMITS} commits, then compact() ({segs['compacted']} segment) vs one commit", rps["compacted"],
            rps["one"], "rows/s", higher_is_better=True, target="≥ 0.8×",
            passed=rps["compacted"] / rps["one"] >= 0.8)
    rep.row(t, f"{COMMITS} commits, automatic merge ({segs['merged']} segments: between merges) vs one commit",
            rps["merged"], rps["one"], "rows/s", higher_is_better=True, target="≥ 0.8×",
            passed=rps["merged"] / rps["one"] >= 0.8)
    rep.row(t, f"{COMMITS} commits, no merge ({segs['raw']} segments) vs one commit", rps["raw"], rps["one"],
            "rows/s", higher_is_better=True, target="(report)", passed=None)
    rep.row(t, "one commit vs np.take on np.load mmap (the limit)", rps["one"], rps["take"], "rows/s",
            higher_is_better=True, target="≥ 0.9×", passed=rps["one"] / rps["take"] >= 0.9)
    for k in ("compacted", "merged", "raw"):
        rep.note(t, f"{k} ÷ one commit, per round (no warm-up; stores opened just before round 1): {spread(k)}")
    for s in stores.values():
        s.close()
    # Compaction of the unmerged store vs a sequential copy of the same bytes, interleaved.
    data = os.path.join(out, "commits-copy")
    comp, copy = [], []
    nbytes = n * ROW_BYTES
    copies = max(5, rounds // 2)
    for r in range(copies):
        work = os.path.join(out, f"commits-work{r}")
        shutil.copytree(paths["raw"], work)
        os.sync()  # (the copy written back now, not beside the timed compaction)
        with actstore.open(work, mode="a") as w:
            back_free_pages(int(1.5 * nbytes))  # (pages the host backs for both: see common.back_free_pages)
            t0 = time.perf_counter()
            w.compact()
            comp.append(time.perf_counter() - t0)
        shutil.rmtree(work)
        os.sync()  # (the freed blocks' discard now, not inside the next timed write: the disk is mounted `discard`)
        back_free_pages(int(1.5 * nbytes))
        copy.append(_copy_rate(npy, data))
        os.unlink(data)
        os.sync()
    c, p = nbytes / statistics.median(comp), nbytes / statistics.median(copy)
    rep.row(t, f"compact() of the {COMMITS}-segment store vs copyfile + fsync of the same bytes", c / 1e6, p / 1e6,
            "MB/s", higher_is_better=True, target="≥ 0.5×", passed=c / p >= 0.5)
    rep.note(t, f"gathers: median over {max(rounds, 5)} interleaved rounds of {calls} calls, the first round after "
                f"open included (none warmed); compaction: median of "
                f"{copies} runs each (page cache warm for both; both fsync; each into pages the host of a virtual "
                f"machine backs, common.back_free_pages)")
    rep.note(t, "compact() also deletes the 64 old segments' files (a profile here: 0.18 s of 0.57 s, unlink on a disk "
                "mounted `discard`); the copy deletes nothing")
    rep.note(t, "compaction times (s): compact() " + ", ".join(f"{x:.2f}" for x in comp)
                + "; copy " + ", ".join(f"{x:.2f}" for x in copy))
    for p_ in paths.values():
        shutil.rmtree(p_, ignore_errors=True)
    os.unlink(npy)
