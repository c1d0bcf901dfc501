"""What travels from the frozen part to the head: :class:`SplitStates` and the head's accepted inputs.

The frozen part's output is the hidden states plus what the upper blocks still
read from the batch: its ``attention_mask`` and, when the caller gave them,
its ``position_ids`` (packed sequences, offsets). :class:`SplitStates` is a
tensor that carries both, through the operations users apply before the head
(``detach``, ``clone``, ``to``, ``float`` / ``half`` / ``bfloat16``, ``cpu``,
``cuda``, ``contiguous``, ``requires_grad_``); any other operation (indexing,
arithmetic, ``torch.cat``) returns a plain tensor, whose rows may no longer
match the mask.

:func:`head_call` turns the head's arguments into one :class:`HeadCall`. A
head whose model reads a padding mask refuses a plain tensor without one
(:class:`~actstore.errors.HeadInputError`): a padded batch run without its mask
gives wrong numbers for the real tokens too. Pass the mask
(``head(states, mask)``, a :class:`~actstore.PaddedBatch`, a dict), or say
explicitly that every token is real: ``head(states, padding=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from actstore.engine.read.ragged import PaddedBatch
from actstore.errors import HeadInputError

__all__ = ["HeadCall", "SplitStates", "default_positions", "head_call", "head_inputs"]

_T = torch.Tensor
# Tensor operations after which the states are the same rows: the result keeps the mask and position ids.
_KEEPS = frozenset({
    _T.detach, _T.detach_, _T.clone, torch.clone, torch.detach, _T.to, _T.float, _T.half, _T.bfloat16, _T.double,
    _T.cpu, _T.cuda, _T.contiguous, _T.requires_grad_, _T.pin_memory, _T.type, _T.type_as,
})


def _moved(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device)


class SplitStates(torch.Tensor):
    """Hidden states ``(batch, tokens, hidden)`` with the batch's ``attention_mask`` and ``position_ids`` attached.

    A tensor in every respect. ``detach``, ``clone``, ``to``, dtype casts
    (``float``, ``half``, ``bfloat16``, ``double``, ``type``), ``cpu``,
    ``cuda``, ``contiguous`` and ``requires_grad_`` return ``SplitStates``
    with the same mask and position ids (moved to the result's device); any
    other operation returns a plain ``torch.Tensor`` without them (its rows may
    not be the batch's any more: pass the mask to the head yourself then).
    Never copies: it shares the states' storage.

    Attributes
    ----------
    attention_mask : torch.Tensor or None
        The batch's 0/1 padding mask ``(batch, tokens)``; ``None``: the frozen
        part ran without one (no padding).
    position_ids : torch.Tensor or None
        The ``position_ids`` the frozen part was given; ``None``: the model's default.
    """

    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @staticmethod
    def __new__(cls, data: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> SplitStates:
        out = torch.Tensor._make_subclass(cls, data, data.requires_grad)
        out.attention_mask = attention_mask
        out.position_ids = position_ids
        return out

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if func not in _KEEPS or not isinstance(src, SplitStates) or not isinstance(out, torch.Tensor):
            return out
        if out is src or isinstance(out, SplitStates) or out.shape != src.shape:
            return out
        kept = out.as_subclass(SplitStates)  # stays on the autograd graph
        kept.attention_mask = _moved(src.attention_mask, out.device)
        kept.position_ids = _moved(src.position_ids, out.device)
        return kept

    def __deepcopy__(self, memo: dict[int, Any]) -> SplitStates:
        data = self.as_subclass(torch.Tensor).detach().clone().requires_grad_(self.requires_grad)
        return SplitStates(data, *(None if t is None else t.clone() for t in (self.attention_mask, self.position_ids)))

    def __reduce_ex__(self, protocol: Any) -> Any:  # workers pickle tensors: send a plain one
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def default_positions(position_ids: torch.Tensor | None, width: int) -> bool:
    """Whether ``position_ids`` are the default of a model counting from 0: ``arange(width)`` in every row."""
    if position_ids is None:
        return True
    if position_ids.shape[-1] != width:
        return False
    ref = torch.arange(width, device=position_ids.device)
    return bool((position_ids == ref).all())


@dataclass(frozen=True, slots=True)
class HeadCall:
    """What the head runs on: the states, their padding mask (``None``: no padding) and ``position_ids``."""

    states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None


_STATE_KEYS = ("hidden_states", "states", "values", "activations")
_MASK_KEYS = ("attention_mask", "mask")


def _unpack(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(states, mask, position_ids)`` as given, before any check (``mask`` may be missing)."""
    kwargs = dict(kwargs)
    mask = kwargs.pop("attention_mask", None)
    positions = kwargs.pop("position_ids", None)
    if "hidden_states" in kwargs:
        states = kwargs.pop("hidden_states")
    elif args:
        states, args = args[0], args[1:]
    else:
        raise TypeError("the head takes the cached states: head(states, attention_mask), a PaddedBatch, "
                        "a (states, mask) tuple or a dict with 'hidden_states' and 'attention_mask'")
    if args:
        if mask is not None or len(args) > 1:
            raise TypeError(f"the head takes (states, attention_mask); got {len(args) + 1} positional arguments")
        mask = args[0]
    if kwargs:
        raise TypeError(f"the head got unexpected arguments {sorted(kwargs)}; it takes (states, attention_mask, "
                        "position_ids=None, padding=None)")
    if isinstance(states, PaddedBatch) or (isinstance(states, tuple) and len(states) in (2, 3)):
        values, inner = states[0], states[1]
        states, mask = values, inner if mask is None else mask
    elif isinstance(states, Mapping):
        key = next((k for k in _STATE_KEYS if k in states), None)
        if key is None:
            raise KeyError(f"the head's dict input has no states under {list(_STATE_KEYS)}; it has {sorted(states)}")
        inner = next((states[k] for k in _MASK_KEYS if k in states), None)
        positions = states.get("position_ids") if positions is None else positions
        states, mask = states[key], inner if mask is None else mask
    if isinstance(states, PaddedBatch):
        states = states.values
    return states, mask, positions


def head_call(args: tuple[Any, ...], kwargs: dict[str, Any], *, masked: bool = False) -> HeadCall:
    """The head's arguments, in any accepted form, as one :class:`HeadCall`.

    Accepted: ``head(states, attention_mask)``, ``head(states,
    padding=False)``, a :class:`~actstore.PaddedBatch` ``(values, mask,
    lengths)`` or a ``(states, mask)`` tuple (what a store's collate gives for
    a ragged field), a dict with ``hidden_states``, ``attention_mask`` and
    optionally ``position_ids``, and :class:`SplitStates` (the frozen part's
    output, which carries its mask and position ids). ``position_ids=`` may
    be given as a keyword.

    Parameters
    ----------
    masked : bool
        Whether the model reads a padding mask. Then a plain tensor without a
        mask is refused unless ``padding=False`` says that every token is real.

    Raises
    ------
    HeadInputError
        ``masked`` and a plain tensor came without a mask and without ``padding=False``.
    TypeError, ValueError, KeyError
        Arguments of the wrong type, count or shape.
    """
    kwargs = dict(kwargs)
    padding = kwargs.pop("padding", None)
    if padding is not None and not isinstance(padding, bool):
        raise TypeError(f"padding must be a bool (padding=False: every token is real); got {padding!r}")
    states, mask, positions = _unpack(args, kwargs)
    if not isinstance(states, torch.Tensor):
        raise TypeError(f"the head's states must be a tensor; got {type(states).__name__}")
    carried = isinstance(states, SplitStates)
    if isinstance(states, SplitStates):
        mask = states.attention_mask if mask is None else mask
        positions = states.position_ids if positions is None else positions
        states = states.as_subclass(torch.Tensor)
    if padding is False and mask is not None and not bool((mask != 0).all()):
        raise ValueError("padding=False says every token is real, but the attention_mask given has padding; "
                         "drop padding=False")
    if mask is None and masked and not carried and padding is not False:
        raise HeadInputError(
            f"the head got a plain tensor of shape {tuple(states.shape)} without an attention_mask, and its model "
            "reads one: a padded batch run without its mask gives wrong states for the real tokens too. Pass the "
            "mask: head(states, attention_mask), head(PaddedBatch) or head({'hidden_states': ..., "
            "'attention_mask': ...}); keep the frozen part's output (SplitStates carries its mask through detach, "
            "clone, to and dtype casts); or, when every token is real, say so: head(states, padding=False)."
        )
    for name, t in (("attention_mask", mask), ("position_ids", positions)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
        if t.shape[-1] != states.shape[1] or (name == "attention_mask" and tuple(t.shape) != tuple(states.shape[:2])):
            want = "the 0/1 padding mask of shape (batch, tokens) = " if name == "attention_mask" else "of width "
            raise ValueError(f"{name} must be {want}{tuple(states.shape[:2])}; got shape {tuple(t.shape)}")
    return HeadCall(states, mask, positions)


def head_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(states, attention_mask)`` of :func:`head_call` (no mask check); kept for callers of the old form."""
    call = head_call(args, kwargs)
    return call.states, call.attention_mask
