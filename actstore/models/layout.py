"""Where a block-structured model keeps its blocks, stem and tail: :class:`BlockLayout`.

The split mechanism (:mod:`actstore.models.blocks`) is the same for every
block-structured model: the frozen part runs the model's own forward and stops
after block ``k``; the head runs the model's own forward with the stem and
blocks ``0..k`` replaced, for that call, by stand-ins that return the cached
states. A layout only says *where* things are, never *how* they compute:

``blocks``
    The container (``nn.ModuleList``) whose children the forward calls in order,
    each returning the residual stream (or a tuple that starts with it).
``stem_point``
    The module whose output, in eval mode, is the stream entering block 0 (the
    split point before every block, ``"embeddings"`` for BERT).
``stubs``
    Modules before the blocks that the head's call replaces too, so that the
    stem costs nothing and needs no token ids or pixels.
``feed``
    The keyword that gives the forward its shape: ``inputs_embeds`` (text) or
    ``pixel_values`` (a 1x1 placeholder image; the stem is replaced); ``None``
    for a custom module, whose forward takes the states positionally.
``shared``
    Modules of the frozen part that the head's call also reads (rotary
    embeddings, DeBERTa's relative embeddings, T5's relative attention bias in
    block 0). They belong to the frozen part: the head never trains them.
``tail``
    Modules after the blocks (final norm, pooler): they belong to the head.
``extras``
    What a block returns besides the stream, for the stand-ins to return too
    (T5 passes its position bias from block 0 to the others; DeBERTa returns
    ``(states, attention)``).
``causal``
    Causal attention.
``left_padding``
    Whether left padding changes a sample's states: ``"refuse"`` (absolute
    positions counted from the row's first token: BERT, DistilBERT, GPT-2,
    rotary decoders), ``"ok"`` (relative positions only: T5, DeBERTa-v2 without
    ``position_biased_input``; no mask at all: ViT) or ``"pad_ids"`` (positions
    counted over the tokens that are not ``config.pad_token_id``: RoBERTa,
    exact when the padding holds that id).
``positions``
    Where ``position_ids`` reach the blocks after the cut: ``""`` (only the
    stem reads them: stored states already hold their effect), ``"mask"`` (the
    mask builder reads them when there is no ``attention_mask``: packed
    sequences; BERT, RoBERTa, GPT-2), ``"blocks"`` (every block: rotary
    embeddings; Llama, Mistral, Qwen2).
``masked``
    Whether the head's forward reads an ``attention_mask`` (a plain tensor
    reaching it without one is refused, see :mod:`actstore.models.states`).

The families that fill it in live in :mod:`actstore.models.families`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockLayout", "Extras", "get_module", "has_module", "tensor_only", "try_get_module"]

Extras = Callable[[nn.Module, torch.Tensor, dict[str, Any]], Any]
"""``extras(base, states, ctx)``: what a stand-in block returns (``ctx`` lives for one head call)."""


def tensor_only(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    """The default :data:`Extras`: a block returns the stream alone."""
    return states


def get_module(module: nn.Module, path: str) -> nn.Module:
    """The attribute at dotted ``path`` of ``module`` (``""``: the module itself); raises ``AttributeError``."""
    obj: Any = module
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def try_get_module(module: nn.Module, path: str) -> Any:
    """:func:`get_module`, or ``None`` where ``path`` leads nowhere."""
    try:
        return get_module(module, path)
    except AttributeError:
        return None


def has_module(module: nn.Module, path: str) -> bool:
    """Whether dotted ``path`` of ``module`` is an ``nn.Module``."""
    return isinstance(try_get_module(module, path), nn.Module)


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Where a model keeps its blocks, stem and tail (names relative to the base model)."""

    name: str
    blocks: str
    stem_point: str | None
    stubs: tuple[str, ...]
    feed: str | None
    shared: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()
    extras: Extras = tensor_only
    causal: bool = False
    left_padding: str = "ok"  # "refuse", "ok" or "pad_ids" (see the module docstring)
    positions: str = ""  # "", "mask" or "blocks": where position_ids reach the blocks after the cut
    masked: bool = False  # the head's forward reads an attention_mask
    use_cache: bool = False  # the forward takes use_cache (turned off for the head's call)
    checked: bool = False  # a custom forward: check that the stream between blocks is what they return

    def block_list(self, base: nn.Module) -> nn.ModuleList | nn.Sequential:
        found = get_module(base, self.blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{type(base).__name__}.{self.blocks} is a {type(found).__name__}, not an nn.ModuleList")
        return found
