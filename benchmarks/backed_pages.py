"""How much of a timed write is the virtual machine's: a 1.08 GB ``tofile`` + fsync, rounds alternating between
a plain start and a start after :func:`benchmarks.common.back_free_pages` (1.5× the bytes touched and freed).

On a guest whose host takes back the memory the guest frees, the page cache's first touch of such pages faults
in the host: the same write then costs several times the CPU.  Run it to see whether this machine does that
before reading a write benchmark (``bench_store.py``'s append race starts every timed write backed)::

    python benchmarks/backed_pages.py [--gb 1.08] [--rounds 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import back_free_pages, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.08)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where the file is written (default: a temp dir under /tmp)")
    args = ap.parse_args()
    data = np.random.default_rng(0).integers(0, 255, int(args.gb * 1e9), dtype=np.uint8)
    out = tempfile.mkdtemp(dir=args.dir)
    path = os.path.join(out, "write.bin")
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "backed": []}
    try:
        for r in range(args.rounds):
            for how in ("plain", "backed") if r % 2 == 0 else ("backed", "plain"):
                if os.path.exists(path):
                    os.unlink(path)
                os.sync()
                if how == "backed":
                    back_free_pages(int(1.5 * data.nbytes))
                t0, c0 = time.perf_counter(), time.process_time()
                with open(path, "wb") as f:
                    data.tofile(f)
                    f.flush()
                    os.fsync(f.fileno())
                times[how].append((time.perf_counter() - t0, time.process_time() - c0))
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(out)
    print(f"- machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"- {args.gb:.2f} GB `tofile` + fsync, {args.rounds} rounds each, alternating\n")
    print("| start | wall s (median) | wall s (range) | CPU s (median) | CPU s (range) |")
    print("|---|---|---|---|---|")
    for how, ts in times.items():
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        print(f"| {how} | {statistics.median(wall):.2f} | {min(wall):.2f}–{max(wall):.2f} | "
              f"{statistics.median(cpu):.2f} | {min(cpu):.2f}–{max(cpu):.2f} |")


if __name__ == "__main__":
    main()
