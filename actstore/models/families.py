"""What ``split`` needs to know about a model family: a small, declarative table.

The mechanism (:mod:`actstore.models.blocks`) is the same for every family: the
frozen part runs the model's own forward and stops after block ``k``; the head
runs the model's own forward with the stem and blocks ``0..k`` replaced, for
that call, by stand-ins that return the cached states. A family only says
*where* things are, never *how* they compute:

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
    ``pixel_values`` (a 1x1 placeholder image; the stem is replaced).
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
``causal`` / ``positions_from_mask``
    Causal attention; whether position ids come from the padding mask
    (RoBERTa), which decides whether left padding changes a sample's states.

Checked against transformers 5.x's modeling files. A model that is not in the
table can still be split by naming its block container (``split(model, at,
blocks="layers", stem="embed")``, the ``custom`` family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

__all__ = ["Family", "detect_family", "custom_family", "KNOWN_MODEL_TYPES"]

Extras = Callable[[nn.Module, torch.Tensor, dict[str, Any]], Any]


def _tensor_only(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    return states


def _with_none(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    return (states, None)  # DeBERTa-v2 layers return (states, attention weights)


def _t5_extras(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    # T5 blocks return (states, self-attention position bias, cross-attention bias); block 0
    # owns the relative attention bias and hands it on. Its compute_bias is what block 0 runs.
    bias = ctx.get("t5_bias")
    if bias is None:
        attention: Any = _get(base, "encoder.block.0.layer.0.SelfAttention")
        n = states.shape[1]
        bias = ctx["t5_bias"] = attention.compute_bias(n, n, device=states.device)
    return (states, bias, None)


@dataclass(frozen=True, slots=True)
class Family:
    """Where a family keeps its blocks, stem and tail (names relative to the base model)."""

    name: str
    blocks: str
    stem_point: str | None
    stubs: tuple[str, ...]
    feed: str | None
    shared: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()
    extras: Extras = _tensor_only
    causal: bool = False
    positions_from_mask: bool = False
    use_cache: bool = False  # the forward takes use_cache (turned off for the head's call)

    def block_list(self, base: nn.Module) -> nn.ModuleList | nn.Sequential:
        found = _get(base, self.blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{type(base).__name__}.{self.blocks} is a {type(found).__name__}, not an nn.ModuleList")
        return found

    @property
    def left_padding_ok(self) -> bool:
        """Whether a left-padded sample's states equal its unpadded states (positions from the mask)."""
        return self.positions_from_mask


def _get(module: nn.Module, path: str) -> nn.Module:
    obj: Any = module
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _has(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(_get(module, path), nn.Module)
    except AttributeError:
        return False


_BERT_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}  # type -> positions from mask
_LLAMA_TYPES = ("llama", "mistral", "qwen2")

KNOWN_MODEL_TYPES = (*_BERT_TYPES, "distilbert", "deberta-v2", "gpt2", *_LLAMA_TYPES, "t5 (T5EncoderModel)", "vit")
"""Hugging Face model types ``split`` knows (base models, not task heads)."""


def detect_family(model: nn.Module) -> Family | str:
    """The family of a Hugging Face base model, or the reason it is not supported."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype is None:
        return "it has no Hugging Face config.model_type"
    if mtype in _BERT_TYPES:
        if not (_has(model, "embeddings") and _has(model, "encoder.layer")):
            return f"its model_type {mtype!r} is known, but it has no embeddings and encoder.layer (a task model?)"
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return "it is configured as a decoder (causal or cross-attention masks are not supported)"
        return Family("bert", "encoder.layer", "embeddings", ("embeddings",), "inputs_embeds", tail=("pooler",),
                      positions_from_mask=_BERT_TYPES[mtype])
    if mtype == "distilbert" and _has(model, "transformer.layer"):
        return Family("distilbert", "transformer.layer", "embeddings", ("embeddings",), "inputs_embeds")
    if mtype == "deberta-v2" and _has(model, "encoder.layer"):
        if getattr(config, "conv_kernel_size", 0) > 0 or getattr(config, "z_steps", 0) > 1:
            return ("its encoder runs a convolution after layer 0 or repeats the last layer (conv_kernel_size, "
                    "z_steps): the stream between blocks is not the blocks' outputs")
        shared = tuple(n for n in ("encoder.rel_embeddings", "encoder.LayerNorm") if _has(model, n))
        return Family("deberta-v2", "encoder.layer", "embeddings", ("embeddings",), "inputs_embeds", shared=shared,
                      extras=_with_none)
    if mtype == "gpt2" and _has(model, "h") and _has(model, "wpe"):
        if getattr(config, "add_cross_attention", False):
            return "it is configured with cross-attention"
        return Family("gpt2", "h", "drop", ("wpe", "drop"), "inputs_embeds", tail=("ln_f",), causal=True,
                      use_cache=True)
    if mtype in _LLAMA_TYPES and _has(model, "layers") and _has(model, "embed_tokens"):
        shared = ("rotary_emb",) if _has(model, "rotary_emb") else ()
        return Family(mtype, "layers", "embed_tokens", (), "inputs_embeds", shared=shared, tail=("norm",),
                      causal=True, use_cache=True)
    if mtype == "t5" and _has(model, "encoder.block"):
        if _has(model, "decoder"):
            return "it is an encoder-decoder T5; split its encoder (transformers.T5EncoderModel) instead"
        return Family("t5", "encoder.block", "encoder.embed_tokens", (), "inputs_embeds",
                      shared=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
                      tail=("encoder.final_layer_norm",), extras=_t5_extras, positions_from_mask=True)
    if mtype == "vit" and _has(model, "embeddings"):
        blocks = "layers" if _has(model, "layers") else "encoder.layer"
        if not _has(model, blocks):
            return "its ViT layout has neither layers nor encoder.layer"
        tail = tuple(n for n in ("layernorm", "pooler") if _has(model, n))
        return Family("vit", blocks, "embeddings", ("embeddings",), "pixel_values", tail=tail)
    if _has(model, "embeddings") and _has(model, "encoder.layer"):
        return (f"its model_type {mtype!r} has a BERT-like layout but is not known to run its layers exactly like "
                "BERT; if its forward runs encoder.layer in order on the stream, pass blocks='encoder.layer'")
    return f"its model_type {mtype!r} is not one split knows ({', '.join(KNOWN_MODEL_TYPES)})"


def custom_family(model: nn.Module, blocks: str, stem: str | None, tail: tuple[str, ...]) -> Family:
    """The family of a module split by the documented protocol (see :func:`actstore.models.split.split`)."""
    if not _has(model, blocks) or not isinstance(_get(model, blocks), (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"blocks={blocks!r}: {type(model).__name__} has no nn.ModuleList or nn.Sequential of that name; "
                        "name the container whose children forward() calls in order on the residual stream")
    if len(cast(nn.ModuleList, _get(model, blocks))) == 0:
        raise ValueError(f"blocks={blocks!r} is empty: nothing to split")
    if stem is not None and not _has(model, stem):
        raise TypeError(f"stem={stem!r}: {type(model).__name__} has no module of that name; name the module whose "
                        "output is the stream entering the first block, or pass stem=None")
    for name in tail:
        if not _has(model, name):
            raise TypeError(f"tail: {type(model).__name__} has no module {name!r}")
    return Family("custom", blocks, stem, (stem,) if stem else (), None, tail=tail)
