"""Factories and small models for tests/test_precompute.py (CLI factories, the kill-and-resume child)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from torch import nn

from actstore.testing.models import VOCAB, tiny_bert, tiny_mlp


def token_lists(n: int, seed: int = 0, lo: int = 3, hi: int = 12) -> list[list[int]]:
    """``n`` token-id lists of random lengths in [lo, hi): [CLS] words [SEP]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        words = torch.randint(5, len(VOCAB), (length - 2,), generator=gen).tolist()
        out.append([2, *words, 3])
    return out


def pad_collate(seqs: list[list[int]], left: bool = False) -> dict[str, torch.Tensor]:
    """A tokenizer-free collate: right- (or left-) padded input_ids and attention_mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def vectors(n: int, dim: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(dim, generator=gen), i % 3) for i in range(n)]


# -- CLI factories ---------------------------------------------------------------------


def mlp_factory() -> nn.Module:
    return tiny_mlp()


def bert_factory() -> tuple[nn.Module, Any]:
    return tiny_bert(), pad_collate


def data_factory() -> list[tuple[torch.Tensor, int]]:
    return vectors(40)


def text_data_factory() -> list[dict[str, Any]]:
    return [{"text": s, "label": i % 2} for i, s in enumerate(token_lists(30))]


def failing_factory() -> nn.Module:
    raise RuntimeError("no weights here")


NOT_CALLABLE = 3


# -- the kill-and-resume child ------------------------------------------------------------


class SlowMLP(nn.Module):
    """tiny_mlp with a pause per forward, so that a parent can kill the run midway."""

    def __init__(self, pause: float = 0.02) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.pause = pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.pause)
        return self.net(x)


def child(path: str, n: int) -> None:
    """Run precompute slowly, committing every 8 rows (killed by the test midway)."""
    from actstore.precompute.api import precompute

    precompute(SlowMLP(), vectors(n), path, layers="net.1", batch_size=4, commit_every_rows=8, progress=False)


if __name__ == "__main__":
    from tests.precompute_helpers import child as run_child  # SlowMLP's class must not live in __main__

    run_child(sys.argv[1], int(sys.argv[2]))
    os._exit(0)
