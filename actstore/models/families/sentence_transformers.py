"""sentence-transformers models whose first module wraps a Hugging Face encoder split by the table.

Blocks are ``0.model.<blocks>.k`` (``0.auto_model...`` is accepted too). The
frozen part is the encoder's (it also takes the features dict of
``model.tokenize(texts)``); the head, :class:`SentenceTransformerHead`, runs
the remaining layers and the model's later modules (pooling, normalize, ...)
and returns the sentence embedding tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from actstore.models.blocks import Head
from actstore.models.capture import canonical_name
from actstore.models.families.base import BlockFamily, SplitPlan
from actstore.models.families.transformers import detect_family

__all__ = ["SentenceTransformerHead", "SentenceTransformersFamily", "sentence_transformer_encoder"]


def sentence_transformer_encoder(model: Any) -> Any:
    """The Hugging Face encoder of a sentence-transformers model, else ``None``."""
    if not isinstance(model, nn.Sequential) or type(model).forward is nn.Sequential.forward:
        return None
    if len(model) == 0:
        return None
    first = model[0]
    encoder = getattr(first, "auto_model", None)
    return encoder if isinstance(encoder, nn.Module) else None


def _check_first_module(first: nn.Module) -> None:
    """Refuse a sentence-transformers input module whose output is not token embeddings."""
    output_name = getattr(first, "module_output_name", "token_embeddings")
    modality = getattr(first, "modality_config", None)
    text = modality.get("text") if isinstance(modality, Mapping) else None
    method_output = text.get("method_output_name") if isinstance(text, Mapping) else None
    if output_name != "token_embeddings" or method_output not in (None, "last_hidden_state"):
        raise TypeError(
            "split() supports sentence-transformers models whose first module writes the "
            "encoder's last_hidden_state to 'token_embeddings'; this one writes "
            f"{method_output!r} to {output_name!r}. Capture a layer with hooks instead "
            "(actstore.capture)."
        )


class SentenceTransformerHead(nn.Module):
    """The upper encoder layers plus a sentence-transformers model's later modules.

    ``forward`` takes the states in any form the transformer head takes (see
    :func:`actstore.models.states.head_call`; a plain tensor needs its mask or
    ``padding=False``), runs encoder layers ``k+1..``,
    then every module after the first (pooling, normalize, dense, ...) on the
    features dict ``{"token_embeddings", "attention_mask"}``, and returns
    ``features["sentence_embedding"]``. Features the model's first module
    would add besides these (a ``prompt_length`` for pooling that excludes
    prompts, ``all_layer_embeddings``) are not available.
    """

    def __init__(self, model: Any, encoder: Head, at: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.modules_after = nn.Sequential(OrderedDict(list(model.named_children())[1:]))
        self.at = at

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = self.encoder.inputs(args, kwargs)
        attention_mask = call.attention_mask
        out = self.encoder.run(call.states, attention_mask, call.position_ids)
        features: dict[str, Any] = {"token_embeddings": out.last_hidden_state}
        if attention_mask is not None:
            features["attention_mask"] = attention_mask
        for module in self.modules_after:
            features = module(features)
        embedding = features.get("sentence_embedding")
        if not isinstance(embedding, torch.Tensor):
            raise RuntimeError(
                "the sentence-transformers modules after the encoder produced no 'sentence_embedding' tensor"
            )
        return embedding


class SentenceTransformersFamily(BlockFamily):
    """sentence-transformers models whose first module's ``auto_model`` is a table family fed ``inputs_embeds``."""

    description = "sentence-transformers models whose first module wraps such an encoder"

    def detect(self, model: Any) -> bool:
        return sentence_transformer_encoder(model) is not None

    def plan(self, model: Any) -> SplitPlan | str:
        encoder = sentence_transformer_encoder(model)
        layout = detect_family(encoder)
        if isinstance(layout, str) or layout.feed != "inputs_embeds":
            return f"its first module's auto_model is not split-able: {layout}"
        _check_first_module(model[0])
        prefix = canonical_name(model, "0.auto_model")
        if prefix is None:
            return "its encoder is not a registered submodule"
        return self.block_plan(layout, encoder, prefix + ".", name="sentence-transformers")

    def split(self, model: Any, plan: SplitPlan, at: str, *, untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
        frozen, head = super().split(model, plan, at, untie_weights=untie_weights)
        if not isinstance(head, Head):
            raise RuntimeError("split: the sentence-transformers encoder did not split into a Head")
        # The sentence embedding comes from the token states: an encoder pooler is in neither part.
        if "pooler" in head.tail:
            del head.tail["pooler"]
        return frozen, SentenceTransformerHead(model, head, at)
