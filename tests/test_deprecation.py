"""Renamed arguments keep working for a while: each old name warns, names its replacement, and does the same thing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import actstore
from actstore.deprecation import moved_attributes, renamed_arguments
from actstore.training.encoder import RecycledEncoder
from tests import data_helpers as h


def test_renamed_argument_warns_and_passes_the_value() -> None:
    @renamed_arguments(old="new")
    def f(*, new: int = 0) -> int:
        return new

    with pytest.warns(DeprecationWarning, match=r"old= is deprecated; use new="):
        assert f(old=3) == 3
    with pytest.raises(TypeError, match="pass new= only"):
        f(old=1, new=2)
    assert f(new=5) == 5


def test_moved_attribute_warns_and_unknown_names_still_raise() -> None:
    get = moved_attributes("pkg.mod", {"Old": ("pkg.New", lambda: 42)})
    with pytest.warns(DeprecationWarning, match=r"pkg.mod.Old is deprecated; use pkg.New"):
        assert get("Old") == 42
    with pytest.raises(AttributeError):
        get("Missing")


def test_datasets_accept_store_or_path_with_a_warning(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    data = h.make_store(path, 20, kind="tuple")
    with pytest.warns(DeprecationWarning, match="store_or_path= is deprecated; use store="):
        old = actstore.ActivationDataset(store_or_path=path)
    assert len(old) == len(actstore.ActivationDataset(store=path)) == 20
    with pytest.warns(DeprecationWarning, match="store_or_path= is deprecated"):
        cached = actstore.CachedDataset(data, store_or_path=path)
    assert len(cached) == len(data)


def test_recycled_encoder_old_names(tmp_path: Any) -> None:
    frozen = h.PaddedFrozen()
    with pytest.warns(DeprecationWarning) as caught:
        enc = RecycledEncoder(frozen, str(tmp_path / "e"), append=True, commit_every=7, collate=list)
    renamed = [w for w in caught if "RecycledEncoder is deprecated" not in str(w.message)]
    assert {str(w.message).split(":")[1].strip().split("=")[0] for w in renamed} == {"commit_every", "collate"}
    assert enc.commit_every_rows == 7 and enc.collate_fn is list


def test_infer_out_dtype_is_store_dtype(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    h.make_fixed_store(path, 10, dim=4)
    head = torch.nn.Identity()
    with pytest.warns(DeprecationWarning, match="out_dtype= is deprecated; use store_dtype="):
        out = actstore.infer(head, path, field="x", check_fingerprint=False, progress=False,
                             out=str(tmp_path / "o"), out_dtype="float16")
    assert out.fields["output"].dtype == "float16"


def test_recycled_encoder_is_deprecated_for_recycle(tmp_path: Any) -> None:
    frozen = torch.nn.Linear(4, 3)
    with pytest.warns(DeprecationWarning, match=r"actstore\.recycle"):
        enc = actstore.RecycledEncoder(frozen, tmp_path / "enc.store", append=True)
    enc.close()
