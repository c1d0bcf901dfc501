"""Hugging Face base models: a small, declarative table of where each model type keeps its blocks.

Each entry is a :class:`~actstore.models.layout.BlockLayout` (names only, see
:mod:`actstore.models.layout`); the mechanism is :mod:`actstore.models.blocks`.
Checked against transformers 5.x's modeling files. A model that is not in the
table can still be split by naming its block container (``split(model, at,
blocks="layers", stem="embed")``, :mod:`actstore.models.families.custom`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actstore.models.families.base import BlockFamily, SplitPlan, split_blocks
from actstore.models.layout import BlockLayout, get_module, has_module
from actstore.models.task import TASK_SUFFIXES, task_base, task_refusal

__all__ = ["KNOWN_MODEL_TYPES", "TransformersFamily", "detect_family", "model_type"]


def _with_none(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    return (states, None)  # DeBERTa-v2 layers return (states, attention weights)


def _t5_extras(base: nn.Module, states: torch.Tensor, ctx: dict[str, Any]) -> Any:
    # T5 blocks return (states, self-attention position bias, cross-attention bias); block 0
    # owns the relative attention bias and hands it on. Its compute_bias is what block 0 runs.
    bias = ctx.get("t5_bias")
    if bias is None:
        attention: Any = get_module(base, "encoder.block.0.layer.0.SelfAttention")
        n = states.shape[1]
        bias = ctx["t5_bias"] = attention.compute_bias(n, n, device=states.device)
    return (states, bias, None)


# type -> left padding: BERT counts positions from the row's first token; RoBERTa and its kin over the
# tokens that are not the pad id (create_position_ids_from_input_ids), so left padding with that id is exact.
_BERT_TYPES = {"bert": "refuse", "roberta": "pad_ids", "xlm-roberta": "pad_ids", "camembert": "pad_ids"}
_LLAMA_TYPES = ("llama", "mistral", "qwen2")

KNOWN_MODEL_TYPES = (*_BERT_TYPES, "distilbert", "deberta-v2", "gpt2", *_LLAMA_TYPES, "t5 (T5EncoderModel)", "vit")
"""Hugging Face model types ``split`` knows (base models, not task heads)."""


def model_type(model: Any) -> str | None:
    """``model.config.model_type``, or ``None`` for a model without a Hugging Face config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def detect_family(model: nn.Module) -> BlockLayout | str:
    """The layout of a Hugging Face base model, or the reason it is not supported."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype is None:
        return "it has no Hugging Face config.model_type"
    if mtype in _BERT_TYPES:
        if not (has_module(model, "embeddings") and has_module(model, "encoder.layer")):
            return f"its model_type {mtype!r} is known, but it has no embeddings and encoder.layer (a task model?)"
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return "it is configured as a decoder (causal or cross-attention masks are not supported)"
        return BlockLayout("bert", "encoder.layer", "embeddings", ("embeddings",), "inputs_embeds", tail=("pooler",),
                           left_padding=_BERT_TYPES[mtype], positions="mask", masked=True)
    if mtype == "distilbert" and has_module(model, "transformer.layer"):
        return BlockLayout("distilbert", "transformer.layer", "embeddings", ("embeddings",), "inputs_embeds",
                           left_padding="refuse", masked=True)
    if mtype == "deberta-v2" and has_module(model, "encoder.layer"):
        if getattr(config, "conv_kernel_size", 0) > 0 or getattr(config, "z_steps", 0) > 1:
            return ("its encoder runs a convolution after layer 0 or repeats the last layer (conv_kernel_size, "
                    "z_steps): the stream between blocks is not the blocks' outputs")
        shared = tuple(n for n in ("encoder.rel_embeddings", "encoder.LayerNorm") if has_module(model, n))
        # Relative positions only, unless absolute position embeddings are added to the input.
        left = "refuse" if getattr(config, "position_biased_input", True) else "ok"
        return BlockLayout("deberta-v2", "encoder.layer", "embeddings", ("embeddings",), "inputs_embeds",
                           shared=shared, extras=_with_none, left_padding=left, masked=True)
    if mtype == "gpt2" and has_module(model, "h") and has_module(model, "wpe"):
        if getattr(config, "add_cross_attention", False):
            return "it is configured with cross-attention"
        return BlockLayout("gpt2", "h", "drop", ("wpe", "drop"), "inputs_embeds", tail=("ln_f",), causal=True,
                           use_cache=True, left_padding="refuse", positions="mask", masked=True)
    if mtype in _LLAMA_TYPES and has_module(model, "layers") and has_module(model, "embed_tokens"):
        shared = ("rotary_emb",) if has_module(model, "rotary_emb") else ()
        return BlockLayout(mtype, "layers", "embed_tokens", (), "inputs_embeds", shared=shared, tail=("norm",),
                           causal=True, use_cache=True, left_padding="refuse", positions="blocks", masked=True)
    if mtype == "t5" and has_module(model, "encoder.block"):
        if has_module(model, "decoder"):
            return "it is an encoder-decoder T5; split its encoder (transformers.T5EncoderModel) instead"
        return BlockLayout("t5", "encoder.block", "encoder.embed_tokens", (), "inputs_embeds",
                           shared=("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
                           tail=("encoder.final_layer_norm",), extras=_t5_extras, masked=True)
    if mtype == "vit" and has_module(model, "embeddings"):
        blocks = "layers" if has_module(model, "layers") else "encoder.layer"
        if not has_module(model, blocks):
            return "its ViT layout has neither layers nor encoder.layer"
        tail = tuple(n for n in ("layernorm", "pooler") if has_module(model, n))
        return BlockLayout("vit", blocks, "embeddings", ("embeddings",), "pixel_values", tail=tail)
    if has_module(model, "embeddings") and has_module(model, "encoder.layer"):
        return (f"its model_type {mtype!r} has a BERT-like layout but is not known to run its layers exactly like "
                "BERT; if its forward runs encoder.layer in order on the stream, pass blocks='encoder.layer'")
    return f"its model_type {mtype!r} is not one split knows ({', '.join(KNOWN_MODEL_TYPES)})"


class TransformersFamily(BlockFamily):
    """Hugging Face base models of the types in :data:`KNOWN_MODEL_TYPES` (any model with a ``config.model_type``),
    and task models around them (:data:`~actstore.models.task.TASK_SUFFIXES`), cut through their base model."""

    description = (f"Hugging Face base models of types {', '.join(KNOWN_MODEL_TYPES)} and their task models "
                   f"({', '.join('*' + s for s in TASK_SUFFIXES)})")

    def detect(self, model: Any) -> bool:
        return model_type(model) is not None

    def plan(self, model: Any) -> SplitPlan | str:
        layout = detect_family(model)
        if not isinstance(layout, str):
            return self.block_plan(layout, model)
        wrapped = task_base(model)
        if wrapped is None:
            return layout
        prefix, base = wrapped
        inner = detect_family(base)
        if isinstance(inner, str):
            return f"its base model model.{prefix} cannot be split: {inner}"
        refusal = task_refusal(model, inner)
        if refusal is not None:
            return refusal
        return self.block_plan(inner, base, prefix + ".")

    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        if plan.layout is None or plan.base is None or plan.base is model:
            return super().split(model, plan, at, untie_weights=untie_weights)
        return split_blocks(model, plan.base, plan.layout, plan.prefix, at, untie_weights, task=True)
