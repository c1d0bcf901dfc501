"""Any other module, by protocol: ``split(model, at, blocks="layers", stem="embed", tail=...)``.

``blocks`` names the ``nn.ModuleList`` whose children ``model.forward`` calls
in order, each taking the residual stream as its first argument and returning
it (or a tuple that starts with it); ``stem`` names the module whose output
enters block 0 (the head's call replaces it, so the head is
``model.forward(states)``); ``tail`` names the modules after the blocks
(default: the other top-level children). A forward that adds a block's output
to the stream itself (blocks returning the branch) is detected when the parts
run and refused, never captured silently wrong.

This family is never detected: ``split``'s ``blocks=`` argument chooses it.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from actstore.models.families.base import BlockFamily, SplitPlan
from actstore.models.layout import BlockLayout, get_module, has_module

__all__ = ["CustomFamily", "custom_family"]


def custom_family(model: nn.Module, blocks: str, stem: str | None, tail: tuple[str, ...]) -> BlockLayout:
    """The layout of a module split by the documented protocol (module docstring)."""
    if not has_module(model, blocks) or not isinstance(get_module(model, blocks), (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"blocks={blocks!r}: {type(model).__name__} has no nn.ModuleList or nn.Sequential of that name; "
                        "name the container whose children forward() calls in order on the residual stream")
    if len(cast(nn.ModuleList, get_module(model, blocks))) == 0:
        raise ValueError(f"blocks={blocks!r} is empty: nothing to split")
    if stem is not None and not has_module(model, stem):
        raise TypeError(f"stem={stem!r}: {type(model).__name__} has no module of that name; name the module whose "
                        "output is the stream entering the first block, or pass stem=None")
    for name in tail:
        if not has_module(model, name):
            raise TypeError(f"tail: {type(model).__name__} has no module {name!r}")
    if not tail:  # default: the top-level children besides the blocks and the stem
        top = blocks.split(".")[0]
        tail = tuple(n for n, _ in model.named_children() if n != top and n != stem)
    return BlockLayout("custom", blocks, stem, (stem,) if stem else (), None, tail=tail, checked=True)


class CustomFamily(BlockFamily):
    """A module split by the protocol of ``blocks=`` / ``stem=`` / ``tail=``."""

    description = "any module by protocol (blocks=, stem=, tail=)"

    def __init__(self, blocks: str, stem: str | None = None, tail: tuple[str, ...] = ()) -> None:
        self.blocks, self.stem, self.tail = blocks, stem, tuple(tail)

    def detect(self, model: Any) -> bool:
        return False  # chosen by split(..., blocks=...), never detected

    def plan(self, model: Any) -> SplitPlan:
        return self.block_plan(custom_family(model, self.blocks, self.stem, self.tail), model)
