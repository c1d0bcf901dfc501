#!/usr/bin/env python
"""How much does precompute cost beyond the forward itself?

Four questions, each answered against a peer measured in the same run:

1. **Overhead.** Wall time of ``actstore.precompute`` against the bare loop
   ``for batch in DataLoader(...): model(batch)`` over the same loader, batch
   size and torch threads, computing up to the same layer (the bare loop runs a
   copy of the model truncated after that layer, or the whole model for the
   final output).  Real MiniLM (all-MiniLM-L6-v2) over the FAQ texts, and a
   ResNet-18-shaped CNN (random weights) over random images.  Target ≤ 1.05×.
2. **Early stop.** precompute capturing MiniLM's middle block (layer 2 of 6)
   against capturing its last one.  Target ≤ 0.6×.
3. **Write rate.** The writer stage alone (batches as the model thread hands
   them over, through the :class:`~actstore.precompute.background.Writer` thread, to
   the final commit), against the disk's sequential write rate (one file, 8 MB
   writes, fsync) in the same round.  Target ≥ 0.8×.  Also shown: precompute
   end to end with a model that does nothing (its output is the data), the
   ceiling of the whole pipeline on this CPU.
4. **Peak memory.** Anonymous and file-backed memory above the post-warm-up
   baseline, sampled apart from ``/proc/self/smaps_rollup`` (peak RSS would count
   the store's own pages that the final merge maps in as if they were heap), for
   20,000 and 200,000 rows of 4 KB and 10 million rows of 64 bytes of a cheap
   model (separate processes), with the anonymous bytes per row (target ≤ 64:
   10 million rows within 1 GB) and rows/s.  ``--only-memory`` runs this alone,
   ``--memory-rows N ...`` at other sizes (64-byte rows).
5. **Range check.** precompute into float16 with the cast's range check
   (the default) and with it switched off (the check patched out), against
   the bare forward, interleaved; and the check alone (min/max of a batch)
   against the cast it guards, on MiniLM-shaped batches.  Target: precompute
   with the check ≤ 1.05× the bare forward.  ``--only-range`` runs this alone.

Each comparison runs in rounds (A, B, then B, A, ...); times are the fastest
round, ratios the median of per-round ratios: other load on the machine changes
slowly compared with a round, so within-round ratios are far steadier.

Usage::

    python benchmarks/bench_precompute.py --quick            # a few minutes
    python benchmarks/bench_precompute.py --data cloud_faq_dataset.jsonl --results benchmarks/results/precompute.md
    python benchmarks/bench_precompute.py --only-range --results benchmarks/results/precompute_range_check.md
    python benchmarks/bench_precompute.py --only-memory --results benchmarks/results/precompute_memory.md
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actstore.precompute.api import precompute  # noqa: E402
from benchmarks.common import Table, machine  # noqa: E402

FAQ = "/work/shared/data/cloud_faq_dataset.jsonl"
MID, LAST = "0.auto_model.encoder.layer.2", "0.auto_model.encoder.layer.5"


def fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


def paired(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function in every round; rounds alternate the order (ABC, CBA, ...).

    Other load on the machine changes slowly compared with one round, so ratios
    taken within a round (see :func:`ratio`) are far steadier than ratios of
    separate runs.  One warm-up call each first.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    times.update({name + CPU: [] for name in fns})
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            times[name + CPU].append(_cpu() - c0)
    return times


CPU = "/cpu"  # paired()'s key suffix for the CPU seconds (user + system, every thread) of a function's rounds


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_ratio(t: dict[str, list[float]], a: str, b: str) -> str:
    """The median per-round ratio of the CPU seconds of ``a`` and ``b``: the work each did, which other jobs on
    the machine change far less than the wall-clock time."""
    r = [x / y for x, y in zip(t[a + CPU], t[b + CPU], strict=True)]
    return f"{statistics.median(r):.3f} ({min(r):.3f}–{max(r):.3f})"


def ratio(t: dict[str, list[float]], a: str, b: str) -> tuple[float, str]:
    """Median over rounds of ``t[a] / t[b]``, and the range as text."""
    r = [x / y for x, y in zip(t[a], t[b], strict=True)]
    return statistics.median(r), f"{min(r):.3f}–{max(r):.3f}"


# -- 1 & 2: MiniLM over the FAQ texts ------------------------------------------------------


def minilm(texts: list[str], tmp: str, batch: int, rounds: int) -> tuple[list[list[Any]], dict[str, list[float]]]:
    from actstore.examples.faq.model import Tokenize, load_minilm

    model = load_minilm().eval()
    tokenize = Tokenize(model)
    loader = torch.utils.data.DataLoader(texts, batch_size=batch, collate_fn=tokenize)
    truncated = copy.deepcopy(model[0].auto_model)
    truncated.encoder.layer = truncated.encoder.layer[:3]  # embeddings + blocks 0..2: what layer 2 needs

    def bare_mid() -> None:
        with torch.inference_mode():
            for b in loader:
                truncated(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          token_type_ids=b["token_type_ids"])

    def bare_out() -> None:
        with torch.inference_mode():
            for b in loader:
                model(b)

    def pre(layer: str | None) -> Callable[[], None]:
        return lambda: precompute(model, texts, fresh(f"{tmp}/minilm"), layers=layer, collate_fn=tokenize,
                                  batch_size=batch, progress=False).close()

    t = paired({"bare_mid": bare_mid, "pre_mid": pre(MID), "pre_last": pre(LAST), "bare_out": bare_out,
                "pre_out": pre(None)}, rounds)
    # resume: everything is stored, nothing is computed
    precompute(model, texts, fresh(f"{tmp}/minilm"), layers=MID, collate_fn=tokenize, batch_size=batch,
               progress=False).close()
    t0 = time.perf_counter()
    precompute(model, texts, f"{tmp}/minilm", layers=MID, collate_fn=tokenize, batch_size=batch,
               progress=False).close()
    t["resume"] = [time.perf_counter() - t0]
    n = len(texts)
    rows = [[f"MiniLM `{MID}` (token-level, ragged)", n, min(t["bare_mid"]), min(t["pre_mid"]),
             *ratio(t, "pre_mid", "bare_mid"), cpu_ratio(t, "pre_mid", "bare_mid")],
            ["MiniLM pooled embedding (`layers=None`)", n, min(t["bare_out"]), min(t["pre_out"]),
             *ratio(t, "pre_out", "bare_out"), cpu_ratio(t, "pre_out", "bare_out")]]
    return rows, t


# -- 5: the range check of the float16 cast ----------------------------------------------------


def range_check(texts: list[str], tmp: str, batch: int, rounds: int) -> list[list[Any]]:
    """precompute (MiniLM layer 2, float16 on disk) with and without the range check, against the bare forward."""
    background = importlib.import_module("actstore.precompute.background")  # (actstore.precompute is the function)
    from actstore.engine.write.validate import cast_overflow
    from actstore.examples.faq.model import Tokenize, load_minilm

    model = load_minilm().eval()
    tokenize = Tokenize(model)
    loader = torch.utils.data.DataLoader(texts, batch_size=batch, collate_fn=tokenize)
    truncated = copy.deepcopy(model[0].auto_model)
    truncated.encoder.layer = truncated.encoder.layer[:3]
    checked = background.narrows

    def bare() -> None:
        with torch.inference_mode():
            for b in loader:
                truncated(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          token_type_ids=b["token_type_ids"])

    def pre(check: bool) -> Callable[[], None]:
        def go() -> None:
            background.narrows = checked if check else (lambda src, dst: False)  # type: ignore[assignment]
            try:
                precompute(model, texts, fresh(f"{tmp}/range"), layers=MID, collate_fn=tokenize, batch_size=batch,
                           store_dtype="float16", progress=False).close()
            finally:
                background.narrows = checked
        return go

    t = paired({"bare": bare, "checked": pre(True), "unchecked": pre(False)}, rounds)
    # the check alone against the cast it guards, on the real tokens of one batch (numpy, the writer's CPU path)
    with torch.inference_mode():
        b = next(iter(loader))
        h = truncated(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      token_type_ids=b["token_type_ids"]).last_hidden_state
    arr = h.reshape(-1, h.shape[-1])[b["attention_mask"].reshape(-1).bool()].numpy()
    reps, check_s, cast_s = 200, [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            cast_overflow(arr, torch.float16)
        t1 = time.perf_counter()
        for _ in range(reps):
            arr.astype(np.float16)
        check_s.append((t1 - t0) / reps)
        cast_s.append((time.perf_counter() - t1) / reps)
    per_batch = min(t["bare"]) / len(loader)
    med, rng = ratio(t, "checked", "bare")
    med_u, rng_u = ratio(t, "unchecked", "bare")
    med_c, rng_c = ratio(t, "checked", "unchecked")
    return [["precompute, range check on (default)", len(texts), min(t["checked"]), f"{med:.3f}", rng],
            ["precompute, range check off", len(texts), min(t["unchecked"]), f"{med_u:.3f}", rng_u],
            ["check on ÷ check off", len(texts), "", f"{med_c:.3f}", rng_c],
            [f"the check alone, one batch ({arr.shape[0]}×{arr.shape[1]} float32 real tokens)", batch,
             min(check_s), f"{min(check_s) / per_batch:.4f} of the batch's forward",
             f"{min(check_s) / min(cast_s):.2f}× the float16 cast itself"]]


# -- 1: a CNN over random images ---------------------------------------------------------------


def resnet18() -> nn.Module:
    """ResNet-18's layout (torchvision names), random weights."""
    from actstore.testing.models import ResNet

    torch.manual_seed(0)
    return ResNet().eval()


def cnn(n: int, size: int, tmp: str, batch: int, rounds: int) -> tuple[list[list[Any]], dict[str, list[float]]]:
    model = resnet18()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, size, size, generator=gen), i % 10) for i in range(n)]
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    truncated = nn.Sequential(*list(model.children())[: list(dict(model.named_children())).index("layer3") + 1])

    def bare(m: nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                for x, _ in loader:
                    m(x)
        return go

    def pre(layer: str | None) -> Callable[[], None]:
        return lambda: precompute(model, data, fresh(f"{tmp}/cnn"), layers=layer, batch_size=batch,
                                  progress=False).close()

    t = paired({"bare_mid": bare(truncated), "pre_mid": pre("layer3"), "bare_out": bare(model),
                "pre_out": pre(None), "pre_l2": pre("layer2"), "pre_l4": pre("layer4")}, rounds)
    rows = [[f"ResNet-18 `layer3`, {size}×{size} images", n, min(t["bare_mid"]), min(t["pre_mid"]),
             *ratio(t, "pre_mid", "bare_mid"), cpu_ratio(t, "pre_mid", "bare_mid")],
            [f"ResNet-18 output, {size}×{size} images", n, min(t["bare_out"]), min(t["pre_out"]),
             *ratio(t, "pre_out", "bare_out"), cpu_ratio(t, "pre_out", "bare_out")]]
    return rows, t


# -- 3: writing alone ----------------------------------------------------------------------------


class Emit(nn.Module):
    """Turns a batch of row numbers into ``width`` float32 values a row: the data is the output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("base", torch.randn(width, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base + idx[:, None].float()


def disk_rate(directory: str, nbytes: int, block: bytes) -> None:
    """Write ``nbytes`` sequentially (8 MB writes) to one new file and fsync it: what the disk sustains."""
    path = os.path.join(directory, "seq.bin")
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)


def write_rate(tmp: str, nbytes: int, rounds: int, width: int = 4096) -> list[list[Any]]:
    """The writer stage alone, and precompute of a do-nothing model, each paired with the disk."""
    import actstore
    from actstore.precompute.background import Job, Writer
    from actstore.precompute.items import SideColumns

    n = nbytes // (width * 4)
    batch = 256
    data = list(range(n))
    model = Emit(width)
    ready = [(actstore.keys(range(i, min(i + batch, n))), model(torch.arange(i, min(i + batch, n))))
             for i in range(0, n, batch)]
    written = {"writer": 0, "pre": 0}

    def size(path: str) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

    def writer() -> None:  # exactly what the model thread hands over, written by the Writer thread
        store = actstore.create(fresh(f"{tmp}/write"), {"output": actstore.Field((width,), "float32")})
        w = Writer(store, store.fields, SideColumns([]), max_in_flight=4, commit_every_rows=None,
                   commit_every_seconds=60.0)
        w.start()
        for keys, out in ready:
            w.put(Job(keys, {"output": out}, None, None, [None] * len(keys), []))
        w.finish()
        store.commit()
        store.close()
        written["writer"] = size(f"{tmp}/write")

    def pre() -> None:
        precompute(model, data, fresh(f"{tmp}/write"), batch_size=batch, progress=False).close()
        written["pre"] = size(f"{tmp}/write")

    block = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    disk_bytes = (nbytes // len(block)) * len(block)
    t = paired({"disk": lambda: disk_rate(tmp, nbytes, block), "writer": writer, "pre": pre}, rounds)
    shutil.rmtree(f"{tmp}/write", ignore_errors=True)
    out = []
    for name, label in (("writer", "writer stage alone (ready batches → Writer thread → commit)"),
                        ("pre", "precompute end to end, do-nothing model")):
        rates = [(written[name] / a) / (disk_bytes / d) for a, d in zip(t[name], t["disk"], strict=True)]
        out.append([label, f"{n:,} × {width * 4 // 1024} KB", written[name] / 1e6,
                    statistics.median([disk_bytes / d for d in t["disk"]]) / 1e6,
                    statistics.median([written[name] / a for a in t[name]]) / 1e6,
                    statistics.median(rates), f"{min(rates):.3f}–{max(rates):.3f}"])
    return out


# -- 4: peak memory --------------------------------------------------------------------------------


class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Row i is 16 floats computed from i: nothing is held in memory, so only precompute can grow."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.arange(16, dtype=torch.float32) * 1e-3 + i, i % 7


class RowBatches(Rows):
    """Like :class:`Rows`, whole batches at a time (a sampler of index lists): the loader costs ~nothing per row,
    so 10 million rows take minutes and only precompute's own bookkeeping can grow."""

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, int]]:
        return [(torch.arange(16, dtype=torch.float32) * 1e-3 + i, i % 7) for i in idx]


def _rollup() -> tuple[int, int]:
    """(anonymous, file-backed) resident kB of this process, from /proc/self/smaps_rollup."""
    rss = anon = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                anon = int(line.split()[1])
    return anon, rss - anon


class Sampler:
    """Samples :func:`_rollup` every ``every`` seconds on a thread: the peaks of anonymous and file-backed memory.

    Peak RSS (VmHWM) counts the store's own pages mapped by a merge (page cache the
    kernel can drop at once) with the heap; sampled separately, anonymous memory is
    what precompute really holds.
    """

    def __init__(self, every: float = 0.02) -> None:
        import threading

        self.every = every
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            a, f = _rollup()
            self.anon, self.file = max(self.anon, a), max(self.file, f)
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        a, f = _rollup()
        self.anon, self.file = max(self.anon, a), max(self.file, f)


def memory_child(n: int, path: str, width: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small gains nothing from a second thread on a shared machine
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, width)).eval()
    precompute(model, RowBatches(500), fresh(path), batch_size=256, progress=False).close()  # warm up every path
    base_anon, base_file = _rollup()
    t0 = time.perf_counter()
    with Sampler() as s:
        precompute(model, RowBatches(n), fresh(path), batch_size=256, commit_every_rows=max(20_000, n // 64),
                   progress=False).close()
    print(json.dumps({"rows": n, "width": width, "base_anon_mb": base_anon / 1024, "anon_mb": s.anon / 1024,
                      "base_file_mb": base_file / 1024, "file_mb": s.file / 1024,
                      "seconds": time.perf_counter() - t0, "store_mb": sum(
                          os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6}))
    shutil.rmtree(path, ignore_errors=True)


def memory(tmp: str, sizes: list[tuple[int, int]]) -> list[list[Any]]:
    rows = []
    for k, width in sizes:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory", str(k), f"{tmp}/mem",
                              str(width)], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        grew = r["anon_mb"] - r["base_anon_mb"]
        rows.append([f"{k:,}", f"{width * 4} B", r["store_mb"], r["base_anon_mb"], grew, grew * 2**20 / k,
                     r["file_mb"] - r["base_file_mb"], k / r["seconds"], f"{os.getloadavg()[0]:.1f}"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
    return rows


def memory_sizes(quick: bool, given: list[int] | None) -> list[tuple[int, int]]:
    """(rows, floats a row) of each memory run: 4 KB rows at two sizes, then 64-byte rows at 10 million."""
    if given:
        return [(n, 16) for n in given]
    return [(10_000, 1024), (100_000, 16)] if quick else [(20_000, 1024), (200_000, 1024), (10_000_000, 16)]


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description="precompute overhead, early stop, write rate and memory")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--data", default=FAQ if os.path.exists(FAQ) else None,
                   help="JSONL with an 'answer' field (default: the cloud FAQ data when present)")
    p.add_argument("--field", default="answer")
    p.add_argument("--dir", help="scratch directory (default: a temporary one); its disk is the one measured")
    p.add_argument("--results", help="also write the Markdown report here")
    p.add_argument("--only-range", action="store_true", help="only question 5 (the float16 cast's range check)")
    p.add_argument("--only-memory", action="store_true", help="only question 4 (peak memory)")
    p.add_argument("--memory-rows", type=int, nargs="*",
                   help="row counts of the memory runs (default: 20,000, 200,000 at 4 KB and 10,000,000 at 64 B)")
    p.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        memory_child(int(args._memory[0]), args._memory[1], int(args._memory[2]))
        return 0
    quick = args.quick
    tmp = tempfile.mkdtemp(prefix="bench-precompute-", dir=args.dir)
    rounds = 4
    tables: list[Table] = []
    notes = [f"Machine: {machine()}; torch threads: {torch.get_num_threads()}; load average at start "
             f"{os.getloadavg()[0]:.1f}",
             f"Command: `python benchmarks/bench_precompute.py {' '.join(sys.argv[1:])}`",
             f"Times are the fastest of {rounds} rounds; ratios are the median (and range) of per-round ratios, "
             "rounds alternating the order of the runs compared."]
    if args.only_memory:
        mem = Table("Peak memory over the baseline (cheap model; separate processes; sampled from smaps_rollup)",
                    ["rows", "row size", "store MB", "baseline anonymous MB", "anonymous peak − baseline MB",
                     "anonymous bytes a row (target ≤ 64)", "file-backed peak − baseline MB", "rows/s", "load"])
        try:
            for r in memory(tmp, memory_sizes(quick, args.memory_rows)):
                mem.add(*r)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        mem.print()
        return _report(args, [mem], notes)
    if args.only_range:
        rounds = 6
        notes[2] = (f"Times are the fastest of {rounds} rounds; ratios are the median (and range) of per-round "
                    "ratios, rounds alternating the order of the runs compared.")
    try:
        if args.data:
            rc = Table("Range check of the float16 cast (MiniLM `" + MID + "`, batch 64, float16 on disk)",
                       ["what", "samples", "seconds", "ratio to the bare forward (target ≤ 1.05)", "range"])
            with open(args.data, encoding="utf-8") as f:
                texts = [json.loads(line)[args.field] for line in f if line.strip()]
            for r in range_check(texts[: 256 if quick else 1024], tmp, 64, rounds):
                rc.add(*r)
            rc.print()
            tables.append(rc)
        if args.only_range:
            return _report(args, tables, notes)
        over = Table("precompute against the bare forward loop (same loader, batch 64, up to the same layer)",
                     ["model / layer", "samples", "bare loop s", "precompute s", "ratio (target ≤ 1.05)", "range",
                      "CPU-time ratio (range)"])
        early = Table("Early stop (precompute, capture the middle block against the last one)",
                      ["capture", "seconds", "ratio to last (target ≤ 0.6)", "range"])
        if args.data:
            with open(args.data, encoding="utf-8") as f:
                texts = [json.loads(line)[args.field] for line in f if line.strip()]
            texts = texts[: 256 if quick else 1024]
            rows, t = minilm(texts, tmp, 64, rounds)
            for r in rows:
                over.add(*r)
            early.add(f"MiniLM `{MID}` (3 of 6 blocks)", min(t["pre_mid"]), *ratio(t, "pre_mid", "pre_last"))
            early.add(f"MiniLM `{LAST}` (6 of 6 blocks)", min(t["pre_last"]), 1.0, "")
            notes.append(f"MiniLM: the first {len(texts):,} texts ({args.field}) of {args.data}; a rerun with "
                         f"everything stored takes {t['resume'][0]:.2f} s ({len(texts) / t['resume'][0]:,.0f} "
                         "samples/s, no forward).")
        else:
            notes.append("MiniLM rows skipped: no --data and the FAQ file is absent.")
        rows, t = cnn(256 if quick else 1024, 112, tmp, 64, rounds)
        for r in rows:
            over.add(*r)
        early.add("ResNet-18 `layer2` (for reference)", min(t["pre_l2"]), *ratio(t, "pre_l2", "pre_l4"))
        early.add("ResNet-18 `layer4`", min(t["pre_l4"]), 1.0, "")
        tables += [over, early]
        over.print()
        early.print()
        write = Table("Writing against the disk's sequential write rate (medians over paired rounds)",
                      ["what", "rows", "MB on disk", "disk MB/s", "MB/s", "ratio (target ≥ 0.8)", "range"])
        for r in write_rate(tmp, (512 if quick else 1024) << 20, 5):
            write.add(*r)
        write.print()
        tables.append(write)
        mem = Table("Peak memory over the baseline (cheap model; separate processes; sampled from smaps_rollup)",
                    ["rows", "row size", "store MB", "baseline anonymous MB", "anonymous peak − baseline MB",
                     "anonymous bytes a row (target ≤ 64)", "file-backed peak − baseline MB", "rows/s",
                     "load"])
        for r in memory(tmp, memory_sizes(quick, args.memory_rows)):
            mem.add(*r)
        mem.print()
        tables.append(mem)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _report(args, tables, notes)


def _report(args: argparse.Namespace, tables: list[Table], notes: list[str]) -> int:
    notes.append(f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs shared the 2 cores).")
    for n in notes:
        print(n)
    if args.results:
        with open(args.results, "w") as f:
            f.write("# precompute benchmark\n\n" + "\n\n".join(t.markdown() for t in tables) + "\n\n")
            f.write("\n".join(f"- {n}" for n in notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
