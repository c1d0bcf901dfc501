"""Small helpers shared by the benchmark scripts: timing, tables, machine info, page cache."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Table", "back_free_pages", "drop_page_cache", "huge_page_share", "machine", "timeit"]


def timeit(fn: Callable[[], Any], *, repeat: int = 5, number: int = 1, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` rounds of ``number`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def machine() -> str:
    """One line describing this machine (for reports); the same line ``actstore bench`` prints."""
    from actstore.cli.bench import machine_description

    return machine_description()


def drop_page_cache(paths: Sequence[str]) -> None:
    """Ask the kernel to drop cached pages of every file under ``paths`` (POSIX_FADV_DONTNEED)."""
    for root in paths:
        files = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def back_free_pages(nbytes: int) -> None:
    """Touch ``nbytes`` of new anonymous memory and free it, so that a write timed next gets backed pages.

    On a virtual machine whose host takes back the memory its guest frees (free
    page reporting, a balloon), the first touch of such a page faults in the
    host: a write of 1.08 GB into the page cache here took 0.29 s of CPU on
    pages the host backed and 1.5 s on pages it had taken back, with the same
    guest counters (``/proc/vmstat``) either way.  Which pages a write gets
    depends on when the memory of the previous round was freed, so timed
    writes swing 2.5× from round to round.  Touching and freeing this memory
    first hands the next write backed pages: both contenders of a write race
    then measure their own work (8 rounds of the peer: 0.68–0.72 s, against
    0.72–2.01 s without).
    """
    import numpy as np

    np.ones(max(nbytes, 0), np.uint8)  # (written, so the kernel backs every page; freed on return)


def huge_page_share(prefix: str) -> float | None:
    """Of this process's resident mapped pages of files under ``prefix``, the share mapped by huge pages
    (``FilePmdMapped`` ÷ ``Rss`` over ``/proc/self/smaps``); None without smaps or resident pages.

    Random reads of a map cost a TLB miss per row where its file's page cache is in small folios, so
    a gather race is only fair when both contenders' files are alike here: the kernel gives large folios
    only while it finds free 2 MiB blocks, which varies from run to run.
    """
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rss = pmd = 0
    inside = False
    for line in lines:
        parts = line.split()
        if not parts[0].endswith(":"):  # a mapping's first line: "start-end perms offset dev inode [path]"
            inside = len(parts) >= 6 and parts[-1].startswith(prefix)
        elif inside and parts[0] == "Rss:":
            rss += int(parts[1])
        elif inside and parts[0] == "FilePmdMapped:":
            pmd += int(parts[1])
    return pmd / rss if rss else None


class Table:
    """Collect rows and print them as a Markdown table (and optionally save JSON)."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[Any]] = []

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            return str(v)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in self.rows]
        return "\n".join(lines)

    def print(self) -> None:
        print(self.markdown(), flush=True)
        print(flush=True)

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"title": self.title, "columns": self.columns, "rows": self.rows, "machine": machine()}, f, indent=1)
