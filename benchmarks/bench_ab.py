"""Did a change slow anything down? The same operations at two commits, interleaved, as a ratio.

Each round runs one child process per tree (the base commit, then this checkout, or the reverse: the order
alternates), and each child times the hot paths through the public API only, so the same child code runs on
both trees:

- ``store[i]``: single random rows from a one-segment store;
- ``gather 1 seg`` / ``gather 4 segs``: random batches of 256 rows from a store written in one commit, and from
  the same rows in four commits (``merge_policy=None``, so four segments);
- ``append+commit``: rows appended and committed in batches;
- ``precompute``: a small MLP over tensor items (rows/s of a fresh run, so the run's bookkeeping dominates);
- ``epoch``: ``CachedDataset`` over that store through a ``DataLoader`` (items/s; the training read path).

The table gives each operation's median rate on both trees and the ratio ``this ÷ base`` (higher is better;
1.00 is no change); the spread says how noisy the machine was.  Run::

    python benchmarks/bench_ab.py --base 2d38663            # a commit (checked out into a temp worktree)
    python benchmarks/bench_ab.py --base /path/to/checkout  # or a directory holding another tree
    python benchmarks/bench_ab.py --base HEAD~3 --rounds 7 --results benchmarks/results/ab.md
    python benchmarks/bench_ab.py --base 2d38663 --this 53cdb54    # two commits, neither checked out here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent('''
    import json, os, sys, tempfile, time
    import numpy as np, torch
    import actstore
    torch.set_num_threads(1)
    rows, dim = int(sys.argv[1]), 384
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    keys = actstore.keys([str(i) for i in range(rows)])
    out = {}
    def rate(n, fn, repeat=3):
        best = 0.0
        for _ in range(repeat):
            t = time.perf_counter(); fn(); best = max(best, n / (time.perf_counter() - t))
        return best
    with tempfile.TemporaryDirectory() as d:
        field = {"h": actstore.Field((dim,), "float16")}
        t0 = time.perf_counter()
        with actstore.create(os.path.join(d, "one"), field) as s:
            for a in range(0, rows, 4096):
                s.append(keys[a:a + 4096], {"h": data[a:a + 4096]})
            s.commit()
        out["append+commit"] = rows / (time.perf_counter() - t0)
        with actstore.create(os.path.join(d, "four"), field) as s:
            s.merge_policy = None
            for part in np.array_split(np.arange(rows), 4):
                s.append(keys[part], {"h": data[part]}); s.commit()
        one, four = actstore.open(os.path.join(d, "one")), actstore.open(os.path.join(d, "four"))
        batches = [np.sort(rng.integers(0, rows, 256)) for _ in range(400)]
        singles = rng.integers(0, rows, 20000).tolist()
        def gather(st):
            return lambda: [st.gather(b, ["h"]) for b in batches]
        def single():
            for i in singles:
                one[i]
        out["store[i]"] = rate(len(singles), single)
        out["gather 1 seg"] = rate(256 * len(batches), gather(one))
        out["gather 4 segs"] = rate(256 * len(batches), gather(four))
        n = min(rows, 20000)
        items = [(torch.from_numpy(data[i].astype(np.float32)), i % 7) for i in range(n)]
        model = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
        t0 = time.perf_counter()
        actstore.precompute(model, items, os.path.join(d, "pre"), layers=["0"], progress=False, batch_size=256)
        out["precompute"] = n / (time.perf_counter() - t0)
        ds = actstore.CachedDataset(items, os.path.join(d, "pre"))
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True)
        def epoch():
            for _ in loader:
                pass
        out["epoch"] = rate(n, epoch)
    print("RESULT " + json.dumps(out))
''')


def tree(ref: str, tmp: str, name: str) -> str:
    """A directory holding a tree: ``ref`` itself when it is one, or a detached worktree of that commit."""
    if os.path.isdir(ref):
        return os.path.abspath(ref)
    path = os.path.join(tmp, name)
    subprocess.run(["git", "-C", HERE, "worktree", "add", "--detach", "-q", path, ref], check=True)
    return path


def run(path: str, rows: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(rows)], cwd=path, env=env, capture_output=True,
                          text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"child in {path} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="a commit, or a directory with another checkout")
    ap.add_argument("--this", help="the tree under test: a commit or a directory (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs both trees once (default 5)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the stores (default 200,000)")
    ap.add_argument("--results", help="also write the Markdown table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = tree(args.base, tmp, "base")
        this = tree(args.this, tmp, "this") if args.this else HERE
        try:
            results: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
            load0 = os.getloadavg()[0]
            for r in range(args.rounds):
                order = [("base", base), ("this", this)] if r % 2 == 0 else [("this", this), ("base", base)]
                for name, path in order:
                    results[name].append(run(path, args.rows))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            load1 = os.getloadavg()[0]
        finally:
            for path in (base, this):
                if path.startswith(tmp):
                    subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", path], check=False)
    lines = [f"A/B: `{args.this or 'this checkout'}` vs `{args.base}`, {args.rounds} interleaved rounds, {args.rows:,} rows × 384 float16; "
             f"load average {load0:.1f} at the start, {load1:.1f} at the end ({os.cpu_count()} CPUs)", "",
             "| operation | base (median /s) | this (median /s) | this ÷ base (median of rounds) | range |",
             "|---|---|---|---|---|"]
    for op in results["base"][0]:
        b = [x[op] for x in results["base"]]
        t = [x[op] for x in results["this"]]
        ratios = [ti / bi for ti, bi in zip(t, b, strict=True)]
        lines.append(f"| {op} | {statistics.median(b):,.0f} | {statistics.median(t):,.0f} | "
                     f"{statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "w") as f:
            this_arg = f" --this {args.this}" if args.this else ""
            f.write(f"# A/B of two commits\n\nCommand: `python benchmarks/bench_ab.py --base {args.base}{this_arg} "
                    f"--rounds {args.rounds} --rows {args.rows}`\n\n{text}\n")


if __name__ == "__main__":
    main()
