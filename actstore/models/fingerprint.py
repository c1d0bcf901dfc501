"""The fingerprint of what stored activations depend on: the frozen part only.

A store of recycled activations is valid as long as the modules that compute
them are unchanged: the stem and the blocks up to the deepest captured layer.
Training the head (the blocks above, the final norm, a pooler) must leave the
store fresh; changing any frozen weight must make it stale.

:func:`frozen_fingerprint` is :func:`actstore.fingerprint` (BLAKE3 over module
names, classes, parameters and buffers) of the frozen part that
:func:`actstore.models.split.split` cuts at the deepest captured layer, so
``frozen_fingerprint(model, [frozen.at]) == frozen_fingerprint(frozen)`` for
``frozen, head = split(model, at)``. For a layer that is not a split point
(a module inside a block) the block containing it is the cut (more than
needed, never less). When ``split`` does not know the model, or the model's
final output is captured, it is the whole model's fingerprint, as before.

The fingerprint does not depend on the wrapper the frozen modules are reached
through: for a Hugging Face task model (``BertForSequenceClassification``)
whose layers lie inside its base model, the cut is the base model's, so
``frozen_fingerprint(classifier, ["bert.encoder.layer.1"]) ==
frozen_fingerprint(split(classifier.bert, "encoder.layer.1")[0])`` (the task
modules, which run after the base model, are not covered: training them
leaves the store fresh). A frozen part's fingerprint names its modules
relative to itself (``layer.0``, ``parts.embeddings``), never by their path
in the model.

Stores written before record the whole model's fingerprint (before this
change, a task model's whole fingerprint);
:func:`fingerprint_matches` accepts it too, as long as it matches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from actstore.format.keys import fingerprint, forward_config
from actstore.models.blocks import Frozen
from actstore.models.capture import FINAL_OUTPUT, canonical_name
from actstore.models.split import plan_split, split, wrapped_base

__all__ = ["KEEP_BYTES", "WeightsWatch", "fingerprint_matches", "frozen_fingerprint", "frozen_part"]


def frozen_part(model: nn.Module, layers: str | Iterable[str] | None) -> nn.Module:
    """The frozen part whose outputs ``layers`` are (``model`` itself when no cut applies).

    Parameters
    ----------
    model : torch.nn.Module
        The model precompute runs, or a frozen part from ``split`` (returned as is).
    layers : str, iterable of str, or None
        Captured module names; ``None`` or ``""`` is the final output.
    """
    if isinstance(model, Frozen) or layers is None:
        return model
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or FINAL_OUTPUT in names:
        return model
    if wrapped_base(model) is not None:  # a task model: the cut is its base model's, layers named in either
        return _inside_base(model, names)
    try:
        plan = plan_split(model)
    except (TypeError, ValueError):
        return _inside_base(model, names)
    points = plan.points
    deepest = -1
    for name in names:
        canonical = canonical_name(model, name)
        if canonical is None:
            return model
        inside = [i for i, p in enumerate(points) if canonical == p or canonical.startswith(p + ".")]
        if not inside:
            return model  # not on the main path (a pooler, a tail module): no cut below the whole model
        deepest = max(deepest, inside[-1])
    return split(model, points[deepest])[0]


def _inside_base(model: nn.Module, names: list[str]) -> nn.Module:
    """The frozen part of a task model's base model when every layer lies inside it (else the whole model).

    Names are taken in the task model (``bert.encoder.layer.1``) or, when they
    name nothing there, in its base model (``encoder.layer.1``, as a store
    computed by the base model records them).
    """
    wrapped = wrapped_base(model)
    if wrapped is None:
        return model
    prefix, base = wrapped
    inner = []
    for name in names:
        canonical = canonical_name(model, name)
        if canonical is not None and canonical.startswith(prefix):
            inner.append(canonical[len(prefix):])
        elif canonical is None and canonical_name(base, name) is not None:
            inner.append(name)
        else:
            return model  # a task module (classifier, LM head) or the model's own output
    found = frozen_part(base, inner)
    return model if found is base else found


def frozen_fingerprint(model: nn.Module, layers: str | Iterable[str] | None = None) -> str:
    """Fingerprint of the modules that compute ``layers`` of ``model`` (64 hex digits).

    Parameters
    ----------
    model : torch.nn.Module
        The full model, or a frozen part from :func:`actstore.models.split.split`.
    layers : str, iterable of str, or None
        The captured layers (precompute's ``layers=``); ignored for a frozen part.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from actstore.models.split import split
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> frozen, head = split(model, "1")
    >>> frozen_fingerprint(model, ["1"]) == frozen_fingerprint(frozen)
    True
    >>> with torch.no_grad():
    ...     _ = head[0].weight.add_(1.0)  # training the head leaves the frozen part's fingerprint alone
    >>> frozen_fingerprint(model, ["1"]) == frozen_fingerprint(frozen)
    True
    """
    return fingerprint(frozen_part(model, layers))


#: Frozen tensors up to this size are kept as a copy when verified, so that an in-place write of the same values
#: (DistributedDataParallel broadcasting buffers before every forward) is told from a change without hashing.
KEEP_BYTES = 1 << 20


class WeightsWatch:
    """Whether a module's weights can have changed since they were last verified (:meth:`verified`), cheaply
    enough to ask at every forward: no value is read unless a tensor's version counter moved.

    :meth:`unchanged` is False when a parameter or buffer was replaced (``module.weight = ...``), given other
    storage (``.to(dtype)`` or ``.to(device)``, which set ``p.data``) or modified in place (``load_state_dict``,
    ``p.mul_(...)`` under ``no_grad``, an optimizer step) — the version counters PyTorch keeps for autograd —
    unless the tensor is small (:data:`KEEP_BYTES`) and still equals its copy from the last verification.  A
    write into a tensor's storage through ``p.data`` (a tensor with a version counter of its own) is not seen;
    :func:`frozen_fingerprint` hashes the values themselves.  The watch holds the tensors (not their ids,
    which a new tensor may reuse once the old one is freed).
    """

    def __init__(self) -> None:
        self._root: nn.Module | None = None
        self._tree: list[tuple[nn.Module, tuple[nn.Module | None, ...]]] = []  # each module and its children
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._ids: tuple[int, ...] = ()
        self._storage: tuple[int, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._kept: dict[int, torch.Tensor] = {}

    def unchanged(self, module: nn.Module) -> bool:
        if module is not self._root:
            return False
        for m, kids in self._tree:  # the same modules (a replaced block or layer is a change; modules compare by `is`)
            if tuple(m._modules.values()) != kids:
                return False
        tensors = _tensors(self._tree)
        if tuple(map(id, tensors)) != self._ids:  # (ids are unique: the watch holds the tensors it compares with)
            return False
        if tuple(t.data_ptr() for t in tensors) != self._storage:  # p.data set (a dtype or device move): no version
            return False
        versions = tuple(t._version for t in tensors)
        if versions != self._versions:
            for i, (was, now) in enumerate(zip(self._versions, versions, strict=True)):
                if was != now and not ((kept := self._kept.get(i)) is not None and torch.equal(kept, tensors[i])):
                    return False
            self._versions = versions
        return True

    def verified(self, module: nn.Module) -> None:
        """Take the module's tensors as they are now as the verified ones."""
        self._root = module
        self._tree = [(m, tuple(m._modules.values())) for m in module.modules()]
        tensors = self._tensors = _tensors(self._tree)
        self._ids = tuple(map(id, tensors))
        self._storage = tuple(t.data_ptr() for t in tensors)
        self._versions = tuple(t._version for t in tensors)
        self._kept = {i: t.detach().clone() for i, t in enumerate(tensors) if t.numel() * t.element_size() <= KEEP_BYTES}


def _tensors(tree: list[tuple[nn.Module, tuple[nn.Module | None, ...]]]) -> tuple[torch.Tensor, ...]:
    """Every parameter and buffer of the modules of ``tree``, read off their dicts (a quarter of the cost of
    ``parameters()`` and ``buffers()``, which walk the tree twice and drop repeats)."""
    out: list[Any] = []
    for m, _ in tree:
        out += m._parameters.values()
        out += m._buffers.values()
    return tuple(t for t in out if t is not None)


def fingerprint_matches(recorded: str | None, fp: str, model: nn.Module,
                        layers: str | Iterable[str] | None = None) -> bool:
    """Whether a store's ``recorded`` fingerprint is ``fp`` or one an older version recorded for the same model.

    ``fp`` is the :func:`frozen_fingerprint` the caller computed (of ``model``'s
    part that computes ``layers``); ``model`` is the full model (for a frozen part
    from ``split``, the model it was cut from).  Older stores record that part's
    fingerprint before the config was covered (``fingerprint(part,
    legacy=True)``), or the whole model's (either way).  Those are hashed only
    when ``fp`` does not match.  A store recording no fingerprint matches nothing.
    """
    if recorded is None:
        return False
    if recorded == fp:
        return True
    part = frozen_part(model, layers)
    whole = model.__dict__.get("root", model) if isinstance(model, Frozen) else model
    older = [lambda: fingerprint(whole)]
    if forward_config(part):
        older.insert(0, lambda: fingerprint(part, legacy=True))
    if forward_config(whole):
        older.append(lambda: fingerprint(whole, legacy=True))
    return any(recorded == candidate() for candidate in older)
