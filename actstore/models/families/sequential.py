"""Plain ``nn.Sequential`` models (``nn.Sequential``'s own ``forward``).

Blocks are the top-level children; a split point is a child name (``"3"``) or
a path into nested plain ``nn.Sequential`` children (``"2.1"``). Both parts
are ``nn.Sequential`` keeping the children's names; at the last child the
head is empty (the identity).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

from torch import nn

from actstore.models.families.base import ModelFamily, SplitPlan

__all__ = ["SequentialFamily", "plain_sequential"]


def plain_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` running its children with ``nn.Sequential.forward``."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _split_sequential(seq: nn.Sequential, path: list[str]) -> tuple[nn.Sequential, nn.Sequential]:
    children = list(seq.named_children())
    names = [name for name, _ in children]
    i = names.index(path[0])
    frozen = OrderedDict(children[:i])
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if len(path) == 1:
        frozen[path[0]] = children[i][1]
    else:
        inner = cast(nn.Sequential, children[i][1])  # checked by SequentialFamily.accepts
        inner_frozen, inner_head = _split_sequential(inner, path[1:])
        frozen[path[0]] = inner_frozen
        if len(inner_head) > 0:
            head[path[0]] = inner_head
    head.update(children[i + 1 :])
    return nn.Sequential(frozen), nn.Sequential(head)


class SequentialFamily(ModelFamily):
    """``nn.Sequential`` with its own ``forward``: the children are the blocks."""

    description = "nn.Sequential"

    def detect(self, model: Any) -> bool:
        return plain_sequential(model)

    def plan(self, model: Any) -> SplitPlan:
        if len(model) == 0:
            raise ValueError("cannot split an empty nn.Sequential")
        return SplitPlan("sequential", self, (), tuple(name for name, _ in model.named_children()))

    def accepts(self, model: Any, plan: SplitPlan, name: str) -> bool:
        """Whether ``name`` walks only through plain ``nn.Sequential`` containers."""
        module = model
        for part in name.split("."):
            if not plain_sequential(module) or part not in module._modules:
                return False
            child = module._modules[part]
            if child is None:
                return False
            module = child
        return True

    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        return _split_sequential(model, at.split("."))
