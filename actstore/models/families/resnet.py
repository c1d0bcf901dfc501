"""torchvision-style ResNets (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``).

Blocks are the stages ``layer1``..``layer4``; ``"maxpool"`` splits after the
stem. Both parts are :class:`ResNetPart`: the head replays torchvision's
``ResNet.forward`` order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actstore.models.families.base import ModelFamily, SplitPlan

__all__ = ["ResNetFamily", "ResNetPart"]

STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")
_ATTRS = (*STEM, *STAGES, "avgpool", "fc")


class ResNetPart(nn.Module):
    """A run of a torchvision-style ResNet's children, in order (shared modules).

    ``frozen`` holds the stem and the first stages; ``head`` the remaining
    stages, ``avgpool`` and ``fc``, with ``torch.flatten(x, 1)`` applied after
    ``avgpool`` as torchvision's ``ResNet.forward`` does. Children keep their
    names, so ``part.state_dict()`` keys match the model's.
    """

    def __init__(self, model: Any, names: tuple[str, ...], at: str) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, getattr(model, name))
        self._names = names
        self.at = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._names:
            x = getattr(self, name)(x)
            if name == "avgpool":
                x = torch.flatten(x, 1)
        return x


# A frozen part's fingerprint covers its class's qualified name (actstore.fingerprint): keep the name stores
# were written with, so that moving the class leaves their fingerprints (and pickles) valid.
ResNetPart.__module__ = "actstore.models.split"


class ResNetFamily(ModelFamily):
    """Any module with torchvision's ResNet children (its ``forward`` is assumed to be torchvision's order)."""

    description = "torchvision-style ResNet (conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc)"

    def detect(self, model: Any) -> bool:
        return all(isinstance(getattr(model, a, None), nn.Module) for a in _ATTRS)

    def plan(self, model: Any) -> SplitPlan:
        return SplitPlan("resnet", self, ("maxpool",), STAGES)

    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        n = plan.blocks.index(at) + 1 if at in plan.blocks else 0
        return ResNetPart(model, (*STEM, *STAGES[:n]), at), ResNetPart(model, (*STAGES[n:], "avgpool", "fc"), at)
