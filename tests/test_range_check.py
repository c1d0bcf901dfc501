"""Casts to a narrower store dtype are range-checked: a finite value never becomes ±inf silently (issue 20, item 3)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import actstore
from actstore import CastOverflowError, Field
from actstore.cli import main as cli_main
from actstore.precompute.background import CastCheck, convert_output
from actstore.training.collate import ActivationCollate
from actstore.training.datasets import ActivationDataset

BIG = 150_000.0  # an outlier feature: beyond float16 (65504), well inside bfloat16 and float32


def identity_model() -> nn.Module:
    """``model[0](x) == x`` exactly: the stored rows are the inputs."""
    lin = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
    return nn.Sequential(lin, nn.ReLU())


def outlier_data(n: int = 16, first: int = 8) -> list[torch.Tensor]:
    """``n`` 6-vectors of small values; items ``first..`` hold one value of ``BIG``."""
    gen = torch.Generator().manual_seed(0)
    items = [torch.rand(6, generator=gen) for _ in range(n)]
    for x in items[first:]:
        x[2] = BIG
    return items


def test_precompute_float16_overflow_raises_before_its_batch_is_committed(tmp_path) -> None:
    data = outlier_data()
    path = tmp_path / "s"
    with pytest.raises(CastOverflowError) as info:
        actstore.precompute(identity_model(), data, path, layers="0", store_dtype="float16", batch_size=4,
                            commit_every_rows=4, progress=False)
    msg = str(info.value)
    assert "field '0'" in msg and "layer '0'" in msg, msg  # the field
    assert "150000" in msg and "65504" in msg, msg  # the largest magnitude, float16's range
    assert "bfloat16" in msg and "float32" in msg and "allow_overflow=True" in msg, msg  # dtypes that hold it, the way past
    assert isinstance(info.value, ValueError) and isinstance(info.value, OverflowError)
    with actstore.open(path) as store:  # the two batches before the outliers are committed, nothing after
        assert len(store) == 8
        assert bool(torch.isfinite(store.gather(np.arange(8))["0"]).all())
        assert (store.lookup([actstore.key(x) for x in data[8:]]) < 0).all()


def test_precompute_bfloat16_and_float32_hold_the_outliers(tmp_path) -> None:
    data = outlier_data()
    for dtype in ("bfloat16", "float32"):
        store = actstore.precompute(identity_model(), data, tmp_path / dtype, layers="0", store_dtype=dtype,
                                    progress=False)
        rows = store.gather(store.view("dataset"), dtype=torch.float32)["0"]
        assert len(store) == 16 and bool(torch.isfinite(rows).all())
        assert float(rows[8:, 2].min()) == pytest.approx(BIG, rel=1e-2)
        store.close()


def test_precompute_allow_overflow_clamps_to_the_largest_float16(tmp_path) -> None:
    data = outlier_data()
    store = actstore.precompute(identity_model(), data, tmp_path / "s", layers="0", store_dtype="float16",
                                allow_overflow=True, progress=False)
    rows = store.gather(store.view("dataset"))["0"]
    assert rows.dtype == torch.float16 and bool(torch.isfinite(rows).all())
    assert rows[8:, 2].tolist() == [65504.0] * 8  # clamped, not inf
    want = torch.stack(data).to(torch.float16)
    want[8:, 2] = 65504.0
    assert torch.equal(rows, want)  # every other value is the plain cast
    store.close()


def test_cli_precompute_allow_overflow(tmp_path) -> None:
    here = os.path.abspath(__file__)
    args = ["precompute", "--model", f"{here}:identity_model", "--data", f"{here}:outlier_data", "--layer", "0",
            "--dtype", "float16", "-q"]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 1  # refused, with the message
    assert cli_main([*args, "--out", str(tmp_path / "b"), "--allow-overflow"]) == 0
    with actstore.open(tmp_path / "b") as store:
        assert float(store.gather(np.arange(len(store)))["0"].abs().max()) == 65504.0


def test_padding_outside_the_tokens_is_not_checked() -> None:
    """Only the stored (real) tokens count: padding positions are trimmed before the check."""
    out = torch.zeros(2, 3, 4)
    out[0, 2] = 1e6  # a padding position of sample 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    index, lengths = mask.reshape(-1).nonzero().squeeze(1), mask.sum(1)
    got = convert_output(out, True, index, lengths, torch.float16, CastCheck("field 'h'"))
    assert got.values.dtype == torch.float16 and len(got.values) == 5
    out[1, 0] = 1e6  # a real token
    with pytest.raises(CastOverflowError, match="field 'h'"):
        convert_output(out, True, index, lengths, torch.float16, CastCheck("field 'h'"))


# -- store.append --------------------------------------------------------------------------------------------


def _keys(n: int) -> list[bytes]:
    return [actstore.key(i) for i in range(n)]


def test_append_float32_beyond_float16_raises_and_writes_nothing(tmp_path) -> None:
    values = np.ones((4, 3), np.float32)
    values[2, 1] = -1e5
    with actstore.create(tmp_path / "s", {"h": Field((3,), "float16")}) as store:
        with pytest.raises(CastOverflowError, match=r"values\['h'\].*100000.*bfloat16 or float32.*allow_overflow"):
            store.append(_keys(4), {"h": values})
        assert store.pending == 0
        assert store.append(_keys(4), {"h": np.ones((4, 3), np.float32)}) == 4  # the handle stays usable
        store.commit()
        assert bool(torch.isfinite(store.gather(np.arange(4))["h"]).all())


@pytest.mark.parametrize("source", [np.float64, np.int64])
def test_append_other_sources_that_overflow_float16(tmp_path, source) -> None:
    values = np.full((2, 3), 70_000, source)
    with actstore.create(tmp_path / "s", {"h": Field((3,), "float16")}) as store, \
            pytest.raises(CastOverflowError, match="70000"):
        store.append(_keys(2), {"h": values})


def test_append_ragged_overflow(tmp_path) -> None:
    rows = [np.ones((2, 3), np.float32), np.full((1, 3), 1e5, np.float32)]
    with actstore.create(tmp_path / "s", {"h": Field((None, 3), "float16")}) as store, \
            pytest.raises(CastOverflowError, match=r"values\['h'\]"):
        store.append(_keys(2), {"h": rows})


def test_append_bfloat16_field_accepts_it(tmp_path) -> None:
    values = np.full((2, 3), 1e5, np.float32)
    with actstore.create(tmp_path / "s", {"h": Field((3,), "bfloat16")}) as store:
        store.append(_keys(2), {"h": values})
        store.commit()
        got = store.gather(np.arange(2), dtype=torch.float32)["h"]
        assert bool(torch.isfinite(got).all()) and float(got.min()) == pytest.approx(1e5, rel=1e-2)


def test_append_allow_overflow_clamps(tmp_path) -> None:
    values = np.array([[1e5, -1e5, 1.5], [65519.0, 65520.0, np.nan]], np.float32)
    with actstore.create(tmp_path / "s", {"h": Field((3,), "float16")}) as store:
        store.append(_keys(2), {"h": values}, allow_overflow=True)
        store.commit()
        got = store.gather(np.arange(2))["h"].float()
    assert got[0].tolist() == [65504.0, -65504.0, 1.5]
    assert got[1, :2].tolist() == [65504.0, 65504.0] and bool(torch.isnan(got[1, 2]))  # NaN stays NaN


def test_append_values_that_round_to_the_largest_float16_pass(tmp_path) -> None:
    """65519 rounds to 65504 (a finite value): only values that would become inf are refused."""
    with actstore.create(tmp_path / "s", {"h": Field((2,), "float16")}) as store:
        store.append(_keys(1), {"h": np.array([[65519.0, -65519.0]], np.float32)})
        with pytest.raises(CastOverflowError):
            store.append(_keys(2)[1:], {"h": np.array([[65520.0, 0.0]], np.float32)})


def test_append_nonfinite_policy_is_unchanged(tmp_path) -> None:
    """NaN and inf already in the data are governed by allow_nonfinite alone; they do not hide an overflow."""
    with actstore.create(tmp_path / "s", {"h": Field((3,), "float16")}) as store:
        store.append(_keys(1), {"h": np.array([[np.nan, np.inf, 1.0]], np.float32)})  # stored as they are
        with pytest.raises(ValueError, match="NaN or infinite"):
            store.append(_keys(2)[1:], {"h": np.array([[np.nan, 1.0, 1.0]], np.float32)}, allow_nonfinite=False)
        with pytest.raises(CastOverflowError):
            store.append(_keys(3)[2:], {"h": np.array([[np.nan, np.inf, 1e5]], np.float32)})
        store.commit()
        got = store.gather(np.arange(1))["h"].float()
    assert bool(torch.isnan(got[0, 0])) and float(got[0, 1]) == float("inf")


@pytest.mark.parametrize(("dtype", "exact", "rounded"), [
    ("float32", [2**40, -(2**24), 16777216, 7], 2**40 + 1),
    ("float16", [4096, -2048, 2048, 65504], 2049),
    ("bfloat16", [256, -256, 512, 3], 257),
])
def test_integers_a_float_field_would_round_are_refused(tmp_path, dtype: str, exact: list[int], rounded: int) -> None:
    with actstore.create(tmp_path / "s", {"v": Field((), dtype)}) as store:
        store.append([actstore.key(i) for i in range(len(exact))], {"v": np.array(exact, np.int64)})
        for bad, named in (([rounded], rounded), ([1, -rounded], -rounded)):
            with pytest.raises(ValueError, match=f"integer {named} is not exactly a {dtype}"):
                store.append([actstore.key(100 + i) for i in range(len(bad))], {"v": np.array(bad, np.int64)})
        store.commit()
        assert store.gather(np.arange(len(exact)))["v"].double().tolist() == [float(x) for x in exact]
    with actstore.create(tmp_path / "u", {"v": Field((), "float32")}) as store, \
            pytest.raises(ValueError, match="integer 18446744073709551615 is not exactly a float32"):
        store.append([actstore.key(0)], {"v": np.array([2**64 - 1], np.uint64)})  # past int64: compared as ints


def test_a_read_cast_that_would_overflow_is_refused(tmp_path) -> None:
    big = np.array([[1, 2, 3], [1e5, 0, 0], [np.inf, 1, 1]], np.float32)
    tok = [np.ones((2, 2), np.float32), np.full((1, 2), 1e6, np.float32), np.array([[np.inf, 1]], np.float32)]
    with actstore.create(tmp_path / "s", {"f": Field((3,), "float32"), "r": Field((None, 2), "float32")}) as store:
        store.append([actstore.key(i) for i in range(3)], {"f": big, "r": tok}, allow_nonfinite=True)
        store.commit()
        for rows in ([1], [0, 1, 2]):
            with pytest.raises(CastOverflowError, match="holds finite values up to 100000 .* float16"):
                store.gather(rows, "f", dtype=torch.float16)
            with pytest.raises(CastOverflowError, match="holds finite values up to 1e\\+06 .* float16"):
                store.gather_padded(rows, "r", dtype=torch.float16)
            with pytest.raises(CastOverflowError, match="float16"):  # a DataLoader's collate casts the same way
                ActivationCollate(torch.float16)(ActivationDataset(store, fields="f").__getitems__(rows))
        # a stored ±inf stays ±inf, padding is not data, and a dtype of larger range holds the values
        assert store.gather([2, 0], "f", dtype=torch.float16)["f"].tolist() == [[float("inf"), 1, 1], [1, 2, 3]]
        assert store.gather_padded([2, 0], "r", dtype=torch.float16, pad_value=float("inf")).values[0, 0, 0] == \
            float("inf")
        assert store.gather([1], "f", dtype=torch.bfloat16)["f"][0, 0] == 99840.0
