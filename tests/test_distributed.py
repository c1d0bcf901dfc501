"""Distributed precompute under torchrun (CPU, gloo): equals one process, resumes with another world size."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
from actstore.precompute.api import precompute
from actstore.precompute.distributed import RankSlice
from actstore.precompute.parts import adopt_leftovers
from actstore.store import clone_store
from actstore.testing.s3_server import free_ports
from tests import dist_helpers

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tests.dist_helpers:model", "--data", "tests.dist_helpers:dataset", "--layer", "net.1",
        "--batch-size", "4", "--commit-every-rows", "4", "-q"]


def torchrun(n: int, out: Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    torchrun_bin = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun_bin, "--standalone", f"--nproc-per-node={n}", "-m", "actstore", "precompute", *ARGS,
           "--out", str(out)]
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def reference(tmp_path: Path) -> actstore.ActivationStore:
    ref = tmp_path / "single"
    if not ref.exists():
        precompute(dist_helpers.model(), dist_helpers.dataset(), ref, layers="net.1", batch_size=4, progress=False)
    return actstore.open(ref)


def same_content(a: actstore.ActivationStore, b: actstore.ActivationStore, exact: bool = True) -> None:
    """Same keys, the same values under each key, and the same dataset order (rows may be numbered differently).

    ``exact``: bit for bit.  Otherwise equal up to the last bits: rows computed in batches of another shape
    than one process would form (a resumed run) may differ there, as a resumed single-process run's do.
    """
    assert len(a) == len(b)
    ka = a.key_at(np.arange(len(a)))
    rows_b = b.lookup(ka)
    assert (rows_b >= 0).all()
    ga, gb = a.gather(np.arange(len(a))), b.gather(rows_b)
    for name in a.fields:
        if exact:
            assert ga[name].numpy().tobytes() == gb[name].numpy().tobytes(), name  # bit for bit
        else:
            np.testing.assert_allclose(ga[name].numpy(), gb[name].numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    va, vb = np.asarray(a.view("dataset")), np.asarray(b.view("dataset"))
    assert np.array_equal(a.key_at(va), b.key_at(vb))


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    proc = torchrun(2, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = actstore.open(out)
    store.verify()
    same_content(reference(tmp_path), store)
    assert not (out / "parts").exists()
    assert store.attrs["precompute"]["dataset_length"] == len(dist_helpers.dataset())


def test_two_ranks_with_stored_augmentations_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    torchrun_bin = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun_bin, "--standalone", "--nproc-per-node=2", "-m", "tests.dist_helpers", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = actstore.open(out)
    store.verify()
    one = dist_helpers.precompute_augmented(str(tmp_path / "single"))
    same_content(one, store)  # the same rows under the same keys, and the same item-major view
    assert len(store.view("dataset")) == 3 * len(dist_helpers.dataset())
    data = dist_helpers.dataset()
    a, b = (actstore.CachedDataset(data, s, augmentation="random", augment=dist_helpers.jitter) for s in (one, store))
    for e in range(3):
        a.set_epoch(e), b.set_epoch(e)
        ra, rb = (d.__getitems__(list(range(len(data)))).rows for d in (a, b))
        assert np.array_equal(one.key_at(ra), store.key_at(rb))  # each position: the same augmentation


def test_a_dead_rank_resumes_with_another_world_size(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    crash = torchrun(2, out, {"DIST_TEST_CRASH_RANK": "1", "DIST_TEST_CRASH_AFTER": "4"})
    assert crash.returncode != 0
    parts = [p for p in (out / "parts").iterdir() if p.name != "lock" and (p / "zarr.json").exists()]
    assert parts and max(len(actstore.open(p)) for p in parts) > 0  # committed work survived the crash
    again = torchrun(3, out)  # another world size: rank 0 adopts the leftovers, everyone skips what is done
    assert again.returncode == 0, again.stderr[-3000:]
    store = actstore.open(out)
    store.verify()
    same_content(reference(tmp_path), store, exact=False)
    assert not (out / "parts").exists()
    assert store.attrs["precompute"]["dataset_length"] == len(dist_helpers.dataset())


def test_ranks_that_disagree_fail_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    port = free_ports(1)[0]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DIST_TEST_N_RANK1": "40",
               "ACTSTORE_DIST_TIMEOUT": "60"}
        procs.append(subprocess.Popen([sys.executable, "-m", "actstore", "precompute", *ARGS, "--out", str(out)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("disagree" in err and "dataset_length" in err for _, err in results), results[0][1][-2000:]
    assert not (out / "zarr.json").exists() and not (out / "parts").exists()


# --- in-process pieces -------------------------------------------------------------------------------


def test_leftover_parts_are_adopted_by_a_single_process_run(tmp_path: Path) -> None:
    data = dist_helpers.dataset()
    root = tmp_path / "store"
    # the part a rank 1 of 2 would have committed before its run was killed
    precompute(dist_helpers.model(), RankSlice(data, 1, 2, 4), root / "parts" / "abc-00001", layers="net.1",
               batch_size=4, progress=False)
    store = precompute(dist_helpers.model(), data, root, layers="net.1", batch_size=4, progress=False)
    assert not (root / "parts").exists()
    store.verify()
    same_content(reference(tmp_path), store, exact=False)
    from actstore.training.recycled import CachedDataset

    assert len(CachedDataset(data, store)) == len(data)  # the recorded dataset length is the whole dataset's


def test_clone_and_incompatible_leftovers(tmp_path: Path) -> None:
    data = dist_helpers.dataset()
    root = tmp_path / "store"
    precompute(dist_helpers.model(), data[:10], root, layers="net.1", batch_size=4, progress=False)
    clone_store(str(root), str(tmp_path / "clone"))
    clone = actstore.open(tmp_path / "clone")
    clone.verify()
    assert len(clone) == 10
    other: Any = dist_helpers.model()
    other.net[0].weight.data.add_(1)  # another model
    precompute(other, data[:4], root / "parts" / "x-00000", layers="net.1", progress=False)
    with pytest.raises(actstore.StoreExistsError, match="another model"):
        adopt_leftovers(str(root), actstore.fingerprint(dist_helpers.model()), ["net.1"], overwrite=False)
    assert adopt_leftovers(str(root), actstore.fingerprint(dist_helpers.model()), ["net.1"], overwrite=True) == 0


def test_rank_blocks_cover_the_dataset_once() -> None:
    from actstore.precompute.distributed import RankIterable, global_position

    data = list(range(23))
    for world in (1, 2, 3, 5):
        for block in (1, 4, 7):
            parts = [RankSlice(data, r, world, block) for r in range(world)]
            got = sorted(x for p in parts for x in (p[i] for i in range(len(p))))
            assert got == data
            for r, p in enumerate(parts):
                assert [p[i] for i in range(len(p))] == list(RankIterable(data, r, world, block))
                assert [global_position(i, r, world, block) for i in range(len(p))] == [p[i] for i in range(len(p))]


@pytest.mark.slow
def test_world_sizes_that_disagree_fail_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    port = free_ports(1)[0]
    procs = []
    for rank, world in ((0, 2), (1, 3)):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "ACTSTORE_DIST_TIMEOUT": "10"}
        procs.append(subprocess.Popen([sys.executable, "-m", "actstore", "precompute", *ARGS, "--out", str(out)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert all("same world size" in err for _, err in results), [err[-1500:] for _, err in results]
    assert not out.exists()
