"""Fuzzing everything actstore parses from disk.

Hostile manifests and metadata (wrong types, huge and negative numbers, NaN and
infinities, deep nesting, path traversal, symbolic links out of the store,
FIFOs, oversized documents) must end in an :class:`actstore.StoreError`
subclass with a message, never another exception, a hang, a read outside the
store or a write anywhere.  A manifest that still parses must either be caught
by ``verify`` or read back exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actstore
from actstore.format.documents import MAX_METADATA_BYTES
from actstore.format.manifest import parse_root

from . import harness as h

ROWS = [(0, 40), (40, 90)]
N = ROWS[-1][1]

# --- guards: no hang, no file access outside the store -----------------------------------

_WATCH: dict[str, Any] = {"root": None, "outside": []}
_LIBS = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)} | {"/usr/", "/proc/self"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    root = _WATCH["root"]
    if root is None:
        return
    if event == "open":
        path, mode = args[0], args[1]
        if not isinstance(path, (str, bytes)):
            return
        p = os.path.realpath(os.fsdecode(path))
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if writing or not (p == root or p.startswith(root + os.sep) or p.startswith(_LIBS)):
            _WATCH["outside"].append((event, p, mode))
    elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
        _WATCH["outside"].append((event, str(args[0]), None))


sys.addaudithook(_audit)


class Hung(BaseException):
    """Raised by the alarm (not an OSError, which actstore would report as damage)."""


@contextlib.contextmanager
def guarded(root: Path, seconds: int = 20) -> Iterator[None]:
    """Fail on a hang (SIGALRM), on any file opened outside ``root``, and on any write."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hung(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    _WATCH["root"], _WATCH["outside"] = os.path.realpath(root), []
    try:
        yield
    finally:
        _WATCH["root"] = None
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not _WATCH["outside"], f"touched files outside the store or wrote: {_WATCH['outside'][:5]}"


def read_everything(path: Path) -> None:
    """Open, read every row, key and view, verify; only StoreError may escape. Exact data if verify passes."""
    try:
        with actstore.open(path) as s:
            n = len(s)
            if n:
                s.gather(np.arange(n))
                s.lookup(s.key_at(np.arange(n)))
                s[0], s[n - 1]  # noqa: B018
            for name in s.views:
                np.asarray(s.view(name)).sum()
            s.verify()
            h.assert_rows(s, N, allow_missing_fields=True)  # verify passed: the data must be exactly right
    except actstore.StoreError as e:
        assert str(e), "an error without a message"
    with contextlib.suppress(actstore.StoreError), actstore.open(path, verify_reads=True) as s:
        n = len(s)
        if n:
            s.gather(np.arange(n))  # verify_reads: damaged metadata/bytes raise, else values are right
            h.assert_rows(s, N, allow_missing_fields=True)


# --- a template store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "template"
    with actstore.create(path, h.FIELDS, chunk_bytes=h.CHUNK_BYTES, attrs={"note": "fuzz"}) as s:
        for lo, hi in ROWS:
            h.append_range(s, lo, hi)
            s.commit()
        s.set_view("order", np.arange(N))
        s.commit()
    return path


@pytest.fixture
def work(template: Path, tmp_path: Path) -> Path:
    p = tmp_path / "s"
    shutil.copytree(template, p)
    return p


RAW = "@@raw@@"
HOSTILE_TEXT = ["../", "../../etc/passwd", "/etc/passwd", "a/../../b", "..", ".", "", "\x00", "zarr.json", "segments",
                "0" * 32, "../" + "0" * 29, "a" * 64, "f" * 64, "__proto__", "lock", "c/0/0", "\\..\\..", "..%2f"]
RAW_FRAGMENTS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "[" * 50000 + "]" * 50000,
                 '{"a":' * 30000 + "1" + "}" * 30000, "1.5", "-1", "0", "18446744073709551616", "true", "null",
                 '"\\ud800"', "[]", "{}"]

hostile = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2**31, 2**53, 2**53 + 1, 2**63, 2**64]),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12), st.sampled_from(HOSTILE_TEXT),
        st.sampled_from(range(len(RAW_FRAGMENTS))).map(lambda i: f"{RAW}{i}"),
    ),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6,
)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return doc


def mutate(doc: Any, data: st.DataObject) -> bytes:
    """Replace, delete or add one node of a JSON document; return the serialised bytes."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        nodes = _nodes(doc)
        path = data.draw(st.sampled_from(nodes), label="node")
        op = data.draw(st.sampled_from(["replace", "delete", "add", "rename"]), label="op")
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if op == "delete" and path and isinstance(parent, (dict, list)):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from([*HOSTILE_TEXT, "extra"]), label="key")] = data.draw(hostile, label="value")
        elif op == "rename" and path and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(HOSTILE_TEXT), label="new key")] = parent.pop(path[-1])
        else:
            doc = _set(doc, path, data.draw(hostile, label="value"))
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    # Raw fragments (NaN, 1e400, deep nesting...) are spliced in where a placeholder string stands.
    for i, fragment in enumerate(RAW_FRAGMENTS):
        text = text.replace(f'"{RAW}{i}"', fragment)
    return text.encode("utf-8", "surrogatepass")


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_FULL = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))


def _fuzz_manifest(work: Path, data: st.DataObject) -> None:
    original = json.loads((work / "zarr.json").read_bytes())
    (work / "zarr.json").write_bytes(mutate(original, data))
    h.count("fuzz_examples")
    with guarded(work):
        read_everything(work)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    work = _fresh(template, tmp_path_factory)
    _fuzz_manifest(work, data)


@pytest.mark.slow
@FUZZ_FULL
@given(data=st.data())
def test_fuzz_manifest_many(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    work = _fresh(template, tmp_path_factory)
    _fuzz_manifest(work, data)


_FRESH: dict[str, Path] = {}


def _fresh(template: Path, factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the template whose metadata is restored before each example."""
    work = _FRESH.get("work")
    if work is None:
        work = _FRESH["work"] = factory.mktemp("fuzz-work") / "s"
        shutil.copytree(template, work)
    for dirpath, _, files in os.walk(template):
        for name in files:
            if name == "zarr.json":
                src = Path(dirpath) / name
                shutil.copyfile(src, work / src.relative_to(template))
    return work


def _fuzz_object(work: Path, data: st.DataObject, which: str) -> None:
    """Forge a consistent store: mutate an object's zarr.json and update its digest in the manifest."""
    root = json.loads((work / "zarr.json").read_bytes())
    m = root["attributes"]["actstore"]
    entry = m["segments"][1] if which == "segment" else m["indexes"][0] if which == "index" else m["views"]["order"]
    sub = {"segment": "segments", "index": "indexes", "view": "views"}[which]
    meta_path = work / sub / entry["id"] / "zarr.json"
    forged = mutate(json.loads(meta_path.read_bytes()), data)
    meta_path.write_bytes(forged)
    entry["meta"] = blake3.blake3(forged).hexdigest()
    (work / "zarr.json").write_text(json.dumps(root))
    h.count("fuzz_examples")
    with guarded(work):
        read_everything(work)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["segment", "index", "view"]))
def test_fuzz_object_metadata(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
                              which: str) -> None:
    _fuzz_object(_fresh(template, tmp_path_factory), data, which)


@pytest.mark.slow
@FUZZ_FULL
@given(data=st.data(), which=st.sampled_from(["segment", "index", "view"]))
def test_fuzz_object_metadata_many(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
                                   which: str) -> None:
    _fuzz_object(_fresh(template, tmp_path_factory), data, which)


def _fuzz_array(work: Path, data: st.DataObject) -> None:
    """Forge an array's zarr.json (and its record and digests up the chain)."""
    root = json.loads((work / "zarr.json").read_bytes())
    entry = root["attributes"]["actstore"]["segments"][0]
    seg = work / "segments" / entry["id"]
    rel = data.draw(st.sampled_from(["fields/h", "keys", "fields/tok/offsets", "fields/tok/values", "fields/lab"]))
    forged = mutate(json.loads((seg / rel / "zarr.json").read_bytes()), data)
    (seg / rel / "zarr.json").write_bytes(forged)
    smeta = json.loads((seg / "zarr.json").read_bytes())
    smeta["attributes"]["actstore_segment"]["files"][f"{rel}/zarr.json"] = {
        "size": len(forged), "blake3": blake3.blake3(forged).hexdigest()}
    sbytes = json.dumps(smeta).encode()
    (seg / "zarr.json").write_bytes(sbytes)
    entry["meta"] = blake3.blake3(sbytes).hexdigest()
    (work / "zarr.json").write_text(json.dumps(root))
    h.count("fuzz_examples")
    with guarded(work):
        read_everything(work)


@FUZZ
@given(data=st.data())
def test_fuzz_array_metadata(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    _fuzz_array(_fresh(template, tmp_path_factory), data)


@pytest.mark.slow
@FUZZ_FULL
@given(data=st.data())
def test_fuzz_array_metadata_many(template: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    _fuzz_array(_fresh(template, tmp_path_factory), data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_fuzz_parse_root_bytes(data: bytes) -> None:
    h.count("fuzz_examples")
    with pytest.raises(actstore.StoreError) as info:
        parse_root(data, "zarr.json")
    assert str(info.value)


# --- hand-made hostile stores ----------------------------------------------------------------


def _segment_dir(work: Path, i: int = 0) -> Path:
    return work / "segments" / actstore.open(work).manifest.segments[i].id


def test_segment_symlinked_out_of_the_store(work: Path, tmp_path: Path) -> None:
    """A segment directory that is a link to a (byte-identical) copy outside the store is refused."""
    seg = _segment_dir(work)
    outside = tmp_path / "outside-segment"
    shutil.move(seg, outside)
    seg.symlink_to(outside, target_is_directory=True)
    with guarded(work), pytest.raises(actstore.CorruptStoreError, match="symbolic link"), actstore.open(work) as s:
        s.gather(np.arange(N))
    with guarded(work), pytest.raises(actstore.CorruptStoreError, match="symbolic link"), actstore.open(work) as s:
        s.verify()
    h.count("fuzz_examples")


def test_data_file_symlinked_out_of_the_store(work: Path, tmp_path: Path) -> None:
    data = _segment_dir(work) / "fields" / "h" / "c" / "0" / "0"
    outside = tmp_path / "outside.bin"
    shutil.move(data, outside)
    data.symlink_to(outside)
    with guarded(work), pytest.raises(actstore.CorruptStoreError, match="symbolic link"), actstore.open(work) as s:
        s.gather(np.arange(N))
    with guarded(work), pytest.raises(actstore.CorruptStoreError, match="symbolic link"), actstore.open(work) as s:
        s.verify()
    h.count("fuzz_examples")


def test_segments_dir_symlink_never_deletes_outside(work: Path, tmp_path: Path) -> None:
    """Regression: with ``segments/`` a link to another directory, open(mode='a') deleted every
    subdirectory there that the manifest did not name (its cleanup of crashed writers)."""
    outside = tmp_path / "outside"
    shutil.move(work / "segments", outside)
    (outside / "precious").mkdir()
    (outside / "precious" / "data.txt").write_text("keep me")
    (work / "segments").symlink_to(outside, target_is_directory=True)
    with pytest.raises(actstore.CorruptStoreError, match="symbolic link"):
        actstore.open(work, mode="a")
    assert (outside / "precious" / "data.txt").read_text() == "keep me"
    with pytest.raises(actstore.CorruptStoreError, match="symbolic link"), actstore.open(work) as s:
        s.gather(np.arange(N))
    h.count("fuzz_examples")


@pytest.mark.parametrize("what", ["file", "dir"])
def test_lock_symlink_never_written_through(work: Path, tmp_path: Path, what: str) -> None:
    """Regression: a lock file (or lock directory) that is a link made open(mode='a') truncate
    and rewrite the file it points to, outside the store."""
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "zarr.json"
    victim.write_text("precious")
    shutil.rmtree(work / "lock")
    if what == "file":
        (work / "lock").mkdir()
        (work / "lock" / "zarr.json").symlink_to(victim)
    else:
        (work / "lock").symlink_to(victim_dir, target_is_directory=True)
    with pytest.raises(actstore.CorruptStoreError, match="symbolic link"):
        actstore.open(work, mode="a")
    assert victim.read_text() == "precious"
    h.count("fuzz_examples")


def test_root_manifest_symlink_is_refused(work: Path, tmp_path: Path) -> None:
    outside = tmp_path / "manifest.json"
    shutil.move(work / "zarr.json", outside)
    (work / "zarr.json").symlink_to(outside)
    with pytest.raises(actstore.CorruptStoreError, match="symbolic link"):  # (the audit hook sees the refused open)
        actstore.open(work)
    h.count("fuzz_examples")


@pytest.mark.parametrize("which", ["root", "segment", "array"])
def test_fifo_instead_of_metadata_does_not_hang(work: Path, which: str) -> None:
    seg = _segment_dir(work)
    target = {"root": work / "zarr.json", "segment": seg / "zarr.json", "array": seg / "fields" / "h" / "zarr.json"}[which]
    target.unlink()
    os.mkfifo(target)
    with guarded(work, seconds=10), pytest.raises(actstore.CorruptStoreError), actstore.open(work) as s:
        s.verify()
    if which != "root":
        with guarded(work, seconds=10), pytest.raises(actstore.CorruptStoreError), \
                actstore.open(work, verify_reads=True) as s:
            s.gather(np.arange(N))
    h.count("fuzz_examples")


@pytest.mark.parametrize("which", ["data", "zarr.json"])
def test_directory_instead_of_file(work: Path, which: str) -> None:
    seg = _segment_dir(work)
    target = seg / "fields" / "h" / ("c/0/0" if which == "data" else "zarr.json")
    target.unlink()
    target.mkdir()
    with guarded(work), pytest.raises(actstore.CorruptStoreError), actstore.open(work) as s:
        s.verify()
    if which == "data":
        with guarded(work), pytest.raises(actstore.CorruptStoreError), actstore.open(work) as s:
            s.gather(np.arange(N))
    h.count("fuzz_examples")


def test_oversized_manifest_is_refused(work: Path) -> None:
    with open(work / "zarr.json", "r+b") as f:  # sparse: cheap to make
        f.truncate(MAX_METADATA_BYTES + 10)
    with guarded(work), pytest.raises(actstore.CorruptStoreError, match="limit"):
        actstore.open(work)
    h.count("fuzz_examples")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**30] * 3, [2**40] * 8, [0], [-1]])
def test_huge_field_shapes_are_refused(work: Path, shape: list[int]) -> None:
    """Regression: a manifest whose field shape overflows 64-bit byte counts reached numpy
    (ValueError: array is too big) instead of being refused as corrupt."""
    doc = json.loads((work / "zarr.json").read_bytes())
    doc["attributes"]["actstore"]["fields"]["h"]["shape"] = shape
    (work / "zarr.json").write_text(json.dumps(doc))
    with guarded(work):
        read_everything(work)
    h.count("fuzz_examples")


# --- atheris (optional) --------------------------------------------------------------------------

ATHERIS_SCRIPT = r'''
import sys
import atheris
import numpy, torch  # (not instrumented: only actstore's own code is)
with atheris.instrument_imports(include=["actstore"]):
    import actstore.format.manifest as fmt
    from actstore.errors import StoreError

def one(data):
    try:
        fmt.parse_root(data, "zarr.json")
    except StoreError:
        pass

atheris.Setup(sys.argv, one)
atheris.Fuzz()
'''


@pytest.mark.parametrize("runs", [pytest.param(3000, id="quick"), pytest.param(100000, id="full", marks=pytest.mark.slow)])
def test_atheris_parse_root(tmp_path: Path, template: Path, runs: int) -> None:
    pytest.importorskip("atheris")
    script = tmp_path / "fuzz_root.py"
    script.write_text(ATHERIS_SCRIPT)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copyfile(template / "zarr.json", corpus / "seed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(actstore.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script), f"-atheris_runs={runs}", "-max_len=4096", "-timeout=10", str(corpus)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    h.count("atheris_runs", runs)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
def test_nonfinite_numbers_in_metadata_are_refused(number: str) -> None:
    from actstore.format.documents import loads

    with pytest.raises(actstore.CorruptStoreError):
        loads(f'{{"a": {number}}}'.encode(), "zarr.json")
    h.count("fuzz_examples")
