"""Shared by the store benchmark's tables: the data's shape, keys and rows, interleaved timing, the report."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import Table, timeit

__all__ = ["APPEND_BATCH", "BATCH", "COLUMNS", "DIM", "DTYPE", "ROW_BYTES", "SEED", "SEGMENTS", "SMALL_ROWS",
           "Report", "fmt_ratio", "make_keys", "make_rows", "package_keys", "race", "step"]

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
    from actstore.hashing import keys as package_keys
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


def race(fns: dict[str, Callable[[], Any]], numbers: dict[str, int], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timeit(fn, repeat=1, number=numbers[name], warmup=0))
    return {k: statistics.median(v) for k, v in times.items()}


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
