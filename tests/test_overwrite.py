"""``overwrite=True`` deletes only what actstore made: a store, or an empty directory; anything else is an error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore import Field
from actstore.cli import main as cli_main
from actstore.engine.lifecycle.storeops import delete_store
from actstore.errors import StoreExistsError


def source(path: Path) -> actstore.ActivationStore:
    s = actstore.create(path, {"h": Field((3,), "float32")})
    s.append([actstore.key(i) for i in range(5)], {"h": np.arange(15, dtype=np.float32).reshape(5, 3)})
    s.commit()
    s.close()
    return actstore.open(path)


def test_infer_overwrite_deletes_only_a_store_or_an_empty_directory(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    head = torch.nn.Linear(3, 2)
    with pytest.raises(StoreExistsError) as e:
        actstore.infer(head, src, out=out, overwrite=True, check_fingerprint=False, progress=False)
    assert str(out) in str(e.value) and "nothing was deleted" in str(e.value)
    assert (out / "notes.txt").read_text() == "the user's own file"
    for out in (tmp_path / "empty", tmp_path / "store"):  # a store, or an empty directory, is replaced
        if out.name == "empty":
            out.mkdir()
        else:
            source(out).close()
        got = actstore.infer(head, src, out=out, overwrite=True, check_fingerprint=False, progress=False)
        assert isinstance(got, actstore.ActivationStore) and set(got.fields) == {"output"} and len(got) == 5
        got.close()


def test_cli_infer_overwrite_keeps_a_users_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source(tmp_path / "src").close()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2,3")
    code = cli_main(["infer", "--store", str(tmp_path / "src"), "--head", "tests.test_overwrite:make_head",
                     "--out", str(out), "--overwrite", "--no-check", "-q"])
    assert code != 0 and "nothing was deleted" in capsys.readouterr().err
    assert (out / "data.csv").exists()


def make_head() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def test_delete_store_refuses_everything_but_a_store_or_an_empty_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')  # a Zarr group, not ours
    for path in (f, other):
        with pytest.raises(StoreExistsError, match="nothing was deleted"):
            delete_store(str(path))
        assert path.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert delete_store(str(empty)) and not empty.exists()
    assert not delete_store(str(tmp_path / "absent"), missing_ok=True)
    source(tmp_path / "s").close()
    assert delete_store(str(tmp_path / "s")) and not os.path.exists(tmp_path / "s")
