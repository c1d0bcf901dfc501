"""A writable handle used in a forked child refuses to write, saying why; the local publish checks its lock."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

import actstore
from actstore import Field
from actstore.errors import StoreLockedError

FIELDS = {"h": Field((2,), "float32")}


def rows(lo: int, hi: int) -> tuple[list[bytes], dict[str, np.ndarray]]:
    return [actstore.key(i) for i in range(lo, hi)], {"h": np.arange(2 * lo, 2 * hi, dtype=np.float32).reshape(-1, 2)}


def in_child(fn: Callable[[], object], out: Path) -> int:
    """Fork; run ``fn`` in the child and write what it returned or raised to ``out``; returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            result: object = {"ok": fn()}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = {"error": type(e).__name__, "message": str(e), "tb": traceback.format_exc()}
        out.write_text(json.dumps(result, default=str))
        os._exit(0)
    return pid


def test_a_forked_child_cannot_append_commit_or_publish(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, FIELDS)
    w.append(*rows(0, 4))
    w.commit()
    w.append(*rows(4, 6))  # pending in the parent at fork time: the parent's, never the child's
    tried = {
        "append": lambda: w.append(*rows(10, 12)),
        "commit": w.commit,
        "abort": w.abort,
        "compact": w.compact,
        "publish": lambda: w._writer.backend.publish(b"{}", w._head.token, []),  # type: ignore[union-attr]
        "close": w.close,
    }
    for what, fn in tried.items():
        out = tmp_path / f"{what}.json"
        _, status = os.waitpid(in_child(fn, out), 0)
        got = json.loads(out.read_text())
        if what == "close":  # closing in the child commits nothing and deletes nothing
            assert "ok" in got, got
            continue
        assert got.get("error") == "StoreLockedError", (what, got)
        assert "forked" in got["message"] and "open the store in this process" in got["message"], got["message"]
    assert w.pending == 2
    w.commit()
    w.append(*rows(6, 8))
    w.close()
    r = actstore.open(path)
    assert r.verify().rows == 8
    assert r.gather(np.arange(8))["h"].numpy().tolist() == rows(0, 8)[1]["h"].tolist()


def test_forked_children_committing_together_lose_no_row(tmp_path: Path) -> None:
    path = tmp_path / "s"
    w = actstore.create(path, FIELDS)
    w.append(*rows(0, 3))
    w.commit()
    pids, outs = [], []
    for c in range(4):
        out = tmp_path / f"child{c}.json"

        def write(c: int = c) -> int:
            w.append(*rows(100 + c, 101 + c))
            return w.commit()

        pids.append(in_child(write, out))
        outs.append(out)
    for pid in pids:
        os.waitpid(pid, 0)
    for out in outs:  # every child refused: a commit that reports success is always there
        assert json.loads(out.read_text()).get("error") == "StoreLockedError"
    w.append(*rows(3, 5))
    w.commit()
    w.close()
    r = actstore.open(path)
    assert r.verify().rows == 5 and len(r) == 5


def test_the_lock_check_fails_in_a_forked_child(tmp_path: Path) -> None:
    w = actstore.create(tmp_path / "s", FIELDS)
    lock = w._writer.lock  # type: ignore[union-attr]
    lock.check()  # the parent holds it
    out = tmp_path / "lock.json"
    os.waitpid(in_child(lock.check, out), 0)
    assert json.loads(out.read_text()).get("error") == StoreLockedError.__name__
    w.close()
