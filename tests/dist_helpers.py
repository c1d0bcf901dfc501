"""Factories for the distributed precompute tests (``torchrun ... -m actstore precompute --model ... --data ...``).

Environment knobs (read in every rank):

- ``DIST_TEST_N``: dataset size (default 48).
- ``DIST_TEST_CRASH_RANK`` / ``DIST_TEST_CRASH_AFTER``: that rank's process dies
  (``os._exit(3)``, no cleanup, after a pause for the writer thread's commits) on its forward
  number ``CRASH_AFTER``.
- ``DIST_TEST_N_RANK1``: rank 1 sees a dataset of this size instead (ranks disagree).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from actstore.testing.models import tiny_mlp
from tests.precompute_helpers import vectors


def dataset() -> list[tuple[torch.Tensor, int]]:
    n = int(os.environ.get("DIST_TEST_N", 48))
    if os.environ.get("RANK") == "1" and os.environ.get("DIST_TEST_N_RANK1"):
        n = int(os.environ["DIST_TEST_N_RANK1"])
    items = vectors(n)
    # Repeated samples (with batches of 4 and 2 ranks): block 12 repeats block 1 (rank 1's) on rank 0, whole;
    # block 13 repeats two samples of block 0 (rank 0's) on rank 1, as a batch of 2.
    return items + items[4:8] + items[0:2]


class CrashingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> Any:
        self.calls += 1
        if (os.environ.get("RANK") == os.environ.get("DIST_TEST_CRASH_RANK")
                and self.calls >= int(os.environ.get("DIST_TEST_CRASH_AFTER", 1 << 30))):
            time.sleep(1.5)  # let the writer thread commit the batches before this one
            os._exit(3)
        return self.net(x)


def model() -> nn.Module:
    m = CrashingMLP()
    m.net.requires_grad_(False)
    return m


def repeats_with_own_labels() -> list[tuple[torch.Tensor, int]]:
    """:func:`dataset` with every repeated input given another label than its first occurrence (100 + i)."""
    items = vectors(int(os.environ.get("DIST_TEST_N", 48)))
    repeats = items[4:8] + items[0:2]
    return items + [(x, 100 + i) for i, (x, _) in enumerate(repeats)]


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x + 0.5 * torch.randn(x.shape, generator=g)


def precompute_augmented(out: str) -> Any:
    """Three stored augmentations of :func:`dataset` (also run under torchrun: ``python -m tests.dist_helpers OUT``)."""
    from actstore import precompute

    return precompute(model(), dataset(), out, layers="net.1", batch_size=4, commit_every_rows=4, progress=False,
                      augment=jitter, augmentations=3)


if __name__ == "__main__":
    import sys

    precompute_augmented(sys.argv[1])
