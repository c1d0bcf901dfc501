"""Conformance of the storage backends (in the style of zarr-python's ``StoreTests``).

:class:`BackendTests` checks what the engine relies on from
:class:`~actstore.storage.base.Backend`; each implementation runs it with its
own ``location`` fixture (a fresh, empty place for a store) and ``make``
(a new backend instance over a location, as another process would make).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actstore.engine.write.segments import write_object
from actstore.errors import StoreExistsError, StoreLockedError
from actstore.format.fields import Field
from actstore.format.layout import INDEXES_DIR, VIEWS_DIR
from actstore.format.manifest import IndexRunInfo, Manifest, ViewInfo, root_document
from actstore.storage.base import Backend, objects_of, remove_unreferenced
from actstore.storage.local import LocalBackend
from actstore.storage.object_backend import ObjectBackend
from actstore.storage.objects import ObjectStore
from actstore.testing.s3_server import SeaweedS3


def manifest(generation: int = 0, indexes: tuple[IndexRunInfo, ...] = (),
             views: dict[str, IndexRunInfo] | None = None) -> Manifest:
    return Manifest(fields={"h": Field((2,), "float32")}, fingerprint=None, attrs={"g": generation},
                    created="2026-01-01T00:00:00+00:00", chunk_bytes=64, generation=generation, indexes=indexes,
                    views={k: ViewInfo(v.id, v.rows, v.meta) for k, v in (views or {}).items()})


def an_object(backend: Backend, directory: str, rows: np.ndarray) -> IndexRunInfo:
    """A small immutable object written under the backend's root, as the engine writes one."""
    return write_object(backend.root, directory, {"row": (rows, "int64")})


class BackendTests:
    """What every backend must do.  Subclasses define the fixtures ``location`` and ``make``."""

    def listed(self, backend: Backend, directory: str) -> list[str]:
        """The objects ``directory`` holds (what :meth:`Backend.list_objects` returns)."""
        return sorted(backend.list_objects(directory))

    @pytest.fixture
    def backend(self, make: Any, location: Any) -> Any:
        b = make(location, "writer")
        yield b
        b.close()

    @pytest.fixture
    def created(self, backend: Backend) -> Any:
        """An initialised, locked, empty store: (backend, lock, the first manifest's token)."""
        backend.before_create()
        lock = backend.lock()
        backend.initialize()
        token = backend.publish(root_document(manifest()), None, [])
        yield backend, lock, token
        lock.release()

    def test_no_manifest_before_the_first_publish(self, backend: Backend) -> None:
        assert not backend.exists()
        with pytest.raises(FileNotFoundError):
            backend.read_manifest()

    def test_manifest_round_trip(self, created: Any, make: Any, location: Any) -> None:
        backend, _, token = created
        assert backend.exists()
        assert backend.read_manifest() == (root_document(manifest()), token)
        other = make(location, "reader")  # another handle sees the same bytes and token
        try:
            assert other.read_manifest() == (root_document(manifest()), token)
        finally:
            other.close()

    def test_publish_over_a_stale_predecessor_is_refused(self, created: Any) -> None:
        backend, _, first = created
        second = backend.publish(root_document(manifest(1)), first, [])
        assert second != first
        with pytest.raises(StoreLockedError):
            backend.publish(root_document(manifest(2)), first, [])  # another writer moved the store on
        with pytest.raises(StoreExistsError):
            backend.publish(root_document(manifest(2)), None, [])  # "create" over an existing store
        assert backend.read_manifest() == (root_document(manifest(1)), second)

    def test_lock_is_exclusive(self, created: Any, make: Any, location: Any) -> None:
        backend, lock, _ = created
        lock.check()
        other = make(location, "second-writer")
        try:
            with pytest.raises(StoreLockedError):
                other.lock()
            lock.release()
            again = other.lock()
            again.check()
            again.release()
        finally:
            other.close()

    def test_list_and_delete_objects(self, created: Any) -> None:
        backend, _, token = created
        kept = an_object(backend, INDEXES_DIR, np.arange(5))
        dropped = an_object(backend, VIEWS_DIR, np.arange(3))
        m = manifest(1, indexes=(kept,), views={"v": dropped})
        token = backend.publish(root_document(m), token, objects_of(m))
        assert self.listed(backend, INDEXES_DIR) == [kept.id]
        assert self.listed(backend, VIEWS_DIR) == [dropped.id]
        backend.delete_object(VIEWS_DIR, dropped.id)
        assert self.listed(backend, VIEWS_DIR) == []
        assert not os.path.exists(os.path.join(backend.root, VIEWS_DIR, dropped.id))  # (the local copy too)
        stray = an_object(backend, INDEXES_DIR, np.arange(2))  # an interrupted writer's object
        backend.publish(root_document(manifest(2, indexes=(kept, stray))), token, [f"{INDEXES_DIR}/{stray.id}"])
        assert self.listed(backend, INDEXES_DIR) == sorted([kept.id, stray.id])
        assert f"{INDEXES_DIR}/{stray.id}" in remove_unreferenced(backend, manifest(2, indexes=(kept,)))
        assert self.listed(backend, INDEXES_DIR) == [kept.id]

    def test_published_files_are_available_locally_with_their_bytes(self, created: Any, make: Any,
                                                                      location: Any) -> None:
        backend, _, token = created
        rows = np.arange(1000, 1040, dtype=np.int64)
        info = an_object(backend, INDEXES_DIR, rows)
        m = manifest(1, indexes=(info,))
        backend.publish(root_document(m), token, objects_of(m))
        reader = make(location, "fresh-reader")
        try:
            base = os.path.join(reader.root, INDEXES_DIR, info.id)
            provide = reader.provider()
            if provide is not None:
                provide(base, info.meta, ["row/c/0"])
            with open(os.path.join(base, "row", "c", "0"), "rb") as f:
                data = f.read()
            assert np.array_equal(np.frombuffer(data[: rows.nbytes], "<i8"), rows)
            with open(os.path.join(backend.root, INDEXES_DIR, info.id, "row", "c", "0"), "rb") as f:
                assert f.read() == data  # the whole shard file, index and checksum included
        finally:
            reader.close()


class TestLocalBackend(BackendTests):
    @pytest.fixture
    def location(self, tmp_path: Path) -> str:
        return str(tmp_path / "store")

    @pytest.fixture
    def make(self) -> Any:
        return lambda location, role: LocalBackend(location)


class TestObjectBackend(BackendTests):
    @pytest.fixture
    def location(self, s3_url: str, s3_server: SeaweedS3) -> tuple[str, dict[str, Any]]:
        return s3_url, s3_server.storage_options

    @pytest.fixture
    def make(self, tmp_path: Path) -> Any:
        def make(location: tuple[str, dict[str, Any]], role: str) -> ObjectBackend:
            url, opts = location
            return ObjectBackend(ObjectStore(url, opts), tmp_path / role, lease_seconds=5)

        return make

    def listed(self, backend: Backend, directory: str) -> list[str]:
        # SeaweedFS lists an emptied prefix as a directory for a while: count prefixes that hold objects.
        objects = backend.objects  # type: ignore[attr-defined]
        names = {p.split(f"/{directory}/", 1)[1].split("/")[0] for p in objects.fs.find(objects.path(directory))}
        assert names - {"zarr.json"} <= set(backend.list_objects(directory))
        return sorted(names - {"zarr.json"})
