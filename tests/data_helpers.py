"""Helpers for the data, sampler and RecycledEncoder tests.

They live in a module (not in the test files) so that DataLoader workers
started with ``spawn`` or ``forkserver`` can import them by name.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import actstore
from actstore import Field
from actstore.format.keys import key
from actstore.training.datasets import ActivationDataset

HIDDEN = 4


def text(i: int) -> str:
    """A deterministic sample text of 1..9 'tokens'."""
    return f"sample {i} " + "w " * (i * 7 % 9)


def tokens_of(t: str) -> int:
    return len(t.split())


def embed(t: str) -> torch.Tensor:
    """A fake per-token encoder: (tokens, HIDDEN) float32, values derived from the text."""
    n = tokens_of(t)
    base = float(sum(t.encode()) % 97)
    return base + torch.arange(n * HIDDEN, dtype=torch.float32).reshape(n, HIDDEN) / 8


def pooled(t: str) -> torch.Tensor:
    return embed(t).mean(0)


class Frozen(nn.Module):
    """A 'frozen module' over raw texts returning a list of per-row ragged activations; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls = 0
        self.rows = 0

    def forward(self, texts: list[str]) -> list[torch.Tensor]:
        self.calls += 1
        self.rows += len(texts)
        return [embed(t) * self.scale for t in texts]


class PaddedFrozen(Frozen):
    """Like :class:`Frozen` but returns ``(padded, mask)`` as a tokenizer-padded encoder would."""

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        rows = super().forward(texts)
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, HIDDEN)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return out, mask


class Pair(NamedTuple):
    text: str
    label: int


def dataset(n: int, kind: str = "tuple") -> list[Any]:
    """A list-backed dataset of n items: tuple (text, label), dict, namedtuple or bare text."""
    if kind == "tuple":
        return [(text(i), i % 5) for i in range(n)]
    if kind == "dict":
        return [{"text": text(i), "label": i % 5, "score": i / 2} for i in range(n)]
    if kind == "namedtuple":
        return [Pair(text(i), i % 5) for i in range(n)]
    return [text(i) for i in range(n)]


def precompute_attrs(n: int, kind: str = "tuple", keys: str = "items") -> dict[str, Any]:
    """The attrs ``actstore.precompute`` records for :func:`dataset` (see ``actstore.training.datasets.precompute_config``).

    ``keys="items"``: rows keyed by the raw texts, as precompute's ``key_fn=actstore.key`` keys them;
    ``"inputs"``: keyed by the model inputs of a frozen module that takes the raw texts (no collate: the same keys).
    """
    if kind in ("tuple", "namedtuple"):
        sample = {"type": "tuple", "length": 2, "input": 0, "side": [{"name": "1", "field": "label", "kind": "int"}],
                  "dropped": []}
    elif kind == "dict":
        sample = {"type": "dict", "keys": ["text", "label", "score"], "input": "text", "dropped": [],
                  "side": [{"name": "label", "field": "label", "kind": "int"},
                           {"name": "score", "field": "score", "kind": "float"}]}
    else:
        sample = {"type": "bare"}
    return {"precompute": {"version": 2, "layers": [{"layer": "encoder.layer.2", "field": "h", "ragged": True}],
                           "sample": sample, "view": "dataset", "dataset_length": n, "key_fn": "actstore.key",
                           "keys": keys, "lengths_fn": None, "collate_fn": "none" if keys == "inputs" else None}}


def make_store(path: str | os.PathLike[str], n: int = 100, *, kind: str = "tuple", commit_every: int = 40,
               dtype: str = "float16", missing: tuple[int, ...] = (), view: bool = True, keys: str = "items") -> list[Any]:
    """Build a store as precompute would for :func:`dataset` ``(n, kind)``; return the dataset.

    Rows are appended in dataset order, committed every ``commit_every`` rows (so
    the store has several segments); ``missing`` positions are left out.
    """
    data = dataset(n, kind)
    fields = {"h": Field((None, HIDDEN), dtype)}
    if kind != "bare":
        fields["label"] = Field((), "int64")
    if kind == "dict":
        fields["score"] = Field((), "float32")
    texts = [text(i) for i in range(n)]
    with actstore.create(path, fields, attrs=precompute_attrs(n, kind, keys)) as s:
        todo = [i for i in range(n) if i not in set(missing)]
        for a in range(0, len(todo), commit_every):
            part = todo[a : a + commit_every]
            values: dict[str, Any] = {"h": [embed(texts[i]) for i in part]}
            if "label" in fields:
                values["label"] = [i % 5 for i in part]
            if "score" in fields:
                values["score"] = [i / 2 for i in part]
            s.append([key(texts[i]) for i in part], values)
            s.commit()
        if view:
            s.set_view("dataset", s.lookup([key(t) for t in texts]))
    return data


def make_fixed_store(path: str | os.PathLike[str], n: int = 1000, dim: int = 16, commit_every: int = 400) -> np.ndarray:
    """A store of n fixed rows ``x`` (float32, row i filled with i) and ``y`` (int64 = i); returns x."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1)
    with actstore.create(path, {"x": Field((dim,), "float32"), "y": Field((), "int64")}) as s:
        for a in range(0, n, commit_every):
            b = min(n, a + commit_every)
            s.append([key(i) for i in range(a, b)], {"x": x[a:b], "y": np.arange(a, b)})
            s.commit()
    return x


class CountingDataset(ActivationDataset):
    """Counts ``__getitem__`` and ``__getitems__`` calls (per process)."""

    item_calls = 0
    items_calls = 0

    def __getitem__(self, i: int) -> Any:
        type(self).item_calls += 1
        return super().__getitem__(i)

    def __getitems__(self, indices: Any) -> Any:
        type(self).items_calls += 1
        return super().__getitems__(indices)


def worker_pid_collate(batch: Any) -> Any:
    """A collate function (importable by spawn workers) that records the worker's pid."""
    from actstore.training.collate import collate

    out = collate(batch)
    out["pid"] = torch.tensor([os.getpid()])
    return out
