"""What a model family is: :class:`ModelFamily`, the plan it makes, and the block families' shared split.

A family recognises the models it knows (:meth:`ModelFamily.detect`), lists
their split points (:meth:`ModelFamily.plan`) and cuts them
(:meth:`ModelFamily.split`). :func:`actstore.models.split.split` asks the
families of :data:`actstore.models.families.FAMILIES` in order and hands the
model to the first that detects it. Adding a family is one module with one
subclass, plus its line in that list.

Most families are block-structured: they subclass :class:`BlockFamily`, say
where the model keeps its blocks (a :class:`~actstore.models.layout.BlockLayout`)
and get the one mechanism of :mod:`actstore.models.blocks` (``Frozen``, ``Head``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import nn

from actstore.errors import SplitError
from actstore.models.blocks import Frozen, Head
from actstore.models.layout import BlockLayout, get_module, try_get_module
from actstore.models.task import task_head_class

__all__ = ["BlockFamily", "ModelFamily", "SplitPlan", "split_blocks"]


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """How one model splits: the family that planned it, its stem and block split points (full names).

    ``layout``, ``base`` and ``prefix`` are set by block families: the layout, the
    module it describes (the model, or the encoder inside a sentence-transformers
    model) and that module's name in the model plus ``"."``.
    """

    family: str  # the name messages and reports show ("sequential", "resnet", "bert", "sentence-transformers", ...)
    kind: ModelFamily
    stems: tuple[str, ...]
    blocks: tuple[str, ...]
    layout: BlockLayout | None = None
    base: nn.Module | None = None
    prefix: str = ""

    @property
    def points(self) -> list[str]:
        return [*self.stems, *self.blocks]


class ModelFamily(ABC):
    """One kind of model ``split`` knows.

    Subclasses set :attr:`description` (for the "supported families" message)
    and implement :meth:`detect`, :meth:`plan` and :meth:`split`.
    """

    description: str = ""

    @abstractmethod
    def detect(self, model: Any) -> bool:
        """Whether ``model`` is of this family (cheap; the first family that says so plans it)."""

    @abstractmethod
    def plan(self, model: Any) -> SplitPlan | str:
        """The split points of ``model``, or the reason it cannot be split (``split`` raises it as a
        :class:`~actstore.errors.SplitError` listing every family)."""

    def accepts(self, model: Any, plan: SplitPlan, name: str) -> bool:
        """Whether the registered module name ``name``, not in ``plan.points``, is a split point too."""
        return False

    @abstractmethod
    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        """``(frozen, head)`` of ``model`` cut after the split point ``at`` (one of ``plan.points``,
        or a name :meth:`accepts`)."""


class BlockFamily(ModelFamily):
    """A family split by the one mechanism of :mod:`actstore.models.blocks`: a subclass only says where things are.

    :meth:`plan` lists the layout's stem point and one point per block;
    :meth:`split` builds :class:`~actstore.models.blocks.Frozen` and
    :class:`~actstore.models.blocks.Head` through :func:`split_blocks`.
    """

    def block_plan(self, layout: BlockLayout, base: nn.Module, prefix: str = "", name: str | None = None) -> SplitPlan:
        """The plan of ``base`` laid out as ``layout``, named ``prefix + ...`` in the model."""
        n = len(layout.block_list(base))
        stems = (f"{prefix}{layout.stem_point}",) if layout.stem_point else ()
        blocks = tuple(f"{prefix}{layout.blocks}.{i}" for i in range(n))
        return SplitPlan(name or layout.name, self, stems, blocks, layout, base, prefix)

    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        if plan.layout is None or plan.base is None:  # block_plan always records both
            raise RuntimeError(f"split: no block layout recorded for the {plan.family} family")
        return split_blocks(model, plan.base, plan.layout, plan.prefix, at, untie_weights)


def _owned(base: nn.Module, layout: BlockLayout, tail: tuple[str, ...]) -> dict[str, nn.Module]:
    """The modules of ``base`` outside the blocks and the tail, shallowest names (the frozen part's own)."""
    owned: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == layout.blocks or path in tail:
                continue
            if layout.blocks.startswith(path + ".") or any(t.startswith(path + ".") for t in tail):
                visit(child, path + ".")
            else:
                owned[path] = child

    visit(base, "")
    return owned


def _check_untied(frozen: nn.Module, head: nn.Module, untie: bool) -> None:
    """Weights shared by both parts: copy them into the head (``untie``) or refuse."""
    frozen_params = {id(p): n for n, p in frozen.named_parameters()}
    tied = [(n, p) for n, p in head.named_parameters(remove_duplicate=False) if id(p) in frozen_params]
    if not tied:
        return
    if not untie:
        names = ", ".join(f"{n} = frozen {frozen_params[id(p)]}" for n, p in tied[:5])
        raise SplitError(
            f"the head and the frozen part share weights ({names}): training the head would change the frozen "
            "part and make its stored activations stale. Pass untie_weights=True to give the head its own copy "
            "(the model is untied), or freeze those weights."
        )
    for name, param in tied:
        owner_name, _, attr = name.rpartition(".")
        owner = head.get_submodule(owner_name)
        setattr(owner, attr, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def split_blocks(root: nn.Module, base: nn.Module, layout: BlockLayout, prefix: str, name: str,
                 untie: bool, *, task: bool = False) -> tuple[Frozen, Head]:
    """Frozen part and head of ``base`` (inside ``root``, named ``prefix``) at the full split point ``name``.

    ``task``: ``root`` is a Hugging Face task model around ``base``; the head is a
    :class:`~actstore.models.task.TaskHead` running ``root``'s forward, holding
    ``root``'s modules outside ``base`` (classifier, LM head) too.
    """
    local = name[len(prefix):] if prefix else name
    blocks = layout.blocks
    k = int(local[len(blocks) + 1:]) if local.startswith(blocks + ".") else -1
    tail = tuple(t for t in layout.tail if isinstance(try_get_module(base, t), nn.Module))
    frozen = Frozen(base, layout, k, name, local, _owned(base, layout, tail), root=root)
    tail_modules = {t: get_module(base, t) for t in tail}
    head: Head
    if task:
        outside = {n: m for n, m in root.named_children() if m is not base}
        head = task_head_class(type(root))(root, base, layout, k, name, tail_modules, outside)
    else:
        head = Head(base, layout, k, name, tail_modules)
    _check_untied(frozen, head, untie)
    return frozen, head
