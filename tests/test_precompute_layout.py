"""The precompute package's layout: a single process never executes code of ``distributed.py``; small modules.

``docs/architecture/precompute.md``: a single-process run — fresh, resumed, or
adopting the parts an interrupted distributed run left — goes api -> run ->
parts; ``distributed.py`` holds what torchrun's ranks need only.  A profiler
hook on every thread records each Python function called during the run.
"""

from __future__ import annotations

import ast
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import actstore
from actstore.precompute import distributed, parts, run
from actstore.precompute.api import precompute
from actstore.testing.models import tiny_mlp
from tests.precompute_helpers import vectors


@contextmanager
def functions_called() -> Iterator[set[tuple[str, str]]]:
    """(file, function) of every Python function called inside the block, on any thread."""
    seen: set[tuple[str, str]] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.add((str(Path(frame.f_code.co_filename).resolve()), frame.f_code.co_name))

    old, old_threads = sys.getprofile(), threading.getprofile()
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(old)
        threading.setprofile(old_threads)


def in_module(seen: set[tuple[str, str]], module: Any) -> list[str]:
    path = str(Path(module.__file__).resolve())
    return sorted(name for file, name in seen if file == path)


def test_the_profiler_sees_distributed_calls() -> None:  # the check below can fail
    with functions_called() as seen:
        distributed.global_position(5, 1, 2, 4)
    assert in_module(seen, distributed) == ["global_position"]


def test_a_single_process_never_runs_distributed_code(tmp_path: Path) -> None:
    model, data = tiny_mlp(), vectors(24)
    root = tmp_path / "store"

    with functions_called() as seen:  # fresh
        precompute(model, data[:8], root, layers="1", batch_size=4, progress=False).close()
    assert in_module(seen, distributed) == []
    assert "run" in in_module(seen, run) and "has_leftovers" in in_module(seen, parts)

    with functions_called() as seen:  # resumed
        store = precompute(model, data[:16], root, layers="1", batch_size=4, progress=False)
    assert len(store) == 16
    store.close()
    assert in_module(seen, distributed) == []

    # the part a rank would have committed before its distributed run was killed: rows 16..19 of the dataset
    precompute(model, data[16:20], root / "parts" / "abc-00001", layers="1", batch_size=4, progress=False).close()
    with functions_called() as seen:  # adopting the leftover part, then computing the rest
        store = precompute(model, data, root, layers="1", batch_size=4, progress=False)
    assert in_module(seen, distributed) == []
    assert "adopt_leftovers" in in_module(seen, parts)
    assert not (root / "parts").exists()
    assert len(store) == 24
    ref = precompute(model, data, tmp_path / "ref", layers="1", batch_size=4, progress=False)
    np.testing.assert_array_equal(store.key_at(np.asarray(store.view("dataset"))),
                                  ref.key_at(np.asarray(ref.view("dataset"))))
    store.close()
    ref.close()
    assert isinstance(actstore.open(root), actstore.ActivationStore)


PACKAGE = Path(run.__file__).resolve().parent


def test_precompute_modules_are_small_and_import_at_module_level() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 500, path.name
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import) and node not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n == "actstore" or n.startswith("actstore.") for n in names), (
                    f"{path.name}:{node.lineno}: a function-level import of {names}")
