"""A quantised ragged field read with ``gather(dtype=...)`` is rounded once, bit-equal to ``gather_padded``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore import Field


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_quantised_ragged_gather_with_dtype_equals_gather_padded(tmp_path: Path, stored: str) -> None:
    s = actstore.create(tmp_path / "s", {"t": Field((None, 16), stored, quantize="int8")})
    rng = np.random.default_rng(0)
    rows = [torch.from_numpy(rng.standard_normal((1 + i % 5, 16)).astype(np.float32) * 30) for i in range(20)]
    s.append([actstore.key(i) for i in range(20)], {"t": rows})
    s.commit()
    idx = np.array([3, 0, 19, 7, 7, 12])
    got = s.gather(idx, dtype=torch.float32)["t"]
    padded = s.gather_padded(idx, "t", dtype=torch.float32)
    assert got.values.dtype == torch.float32
    for i in range(len(idx)):
        n = int(padded.lengths[i])
        assert torch.equal(got[i], padded.values[i, :n]), i  # bit-equal: float32(code) × scale, rounded once
    # in the field's own dtype both round once too, to the same bits
    own = s.gather(idx)["t"]
    own_padded = s.gather_padded(idx, "t")
    for i in range(len(idx)):
        assert torch.equal(own[i], own_padded.values[i, : int(own_padded.lengths[i])]), i
