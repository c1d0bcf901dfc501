"""Split a model into a frozen part and a trainable head at a block boundary.

``frozen, head = split(model, at)`` gives two modules such that
``head(frozen(x))`` computes ``model(x)``: ``frozen`` runs the model up to and
including the block ``at``, ``head`` runs the rest. Both hold the original
submodules (parameters are shared, never copied), so training ``head`` trains
``model``'s upper layers, and the output of ``frozen`` is what a store of
recycled activations holds.

Supported families (detected from the module layout):

``nn.Sequential`` (its own ``forward``)
    Blocks are the top-level children; ``at`` is a child name (``"3"``) or a
    path into nested plain ``nn.Sequential`` children (``"2.1"``). Both parts
    are ``nn.Sequential`` keeping the children's names.
torchvision-style ResNet (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``)
    Blocks are the stages ``layer1``..``layer4``; ``"maxpool"`` splits after
    the stem. The head replays torchvision's ``ResNet.forward`` order: the
    remaining stages, ``avgpool``, ``flatten(1)``, ``fc``.
Hugging Face BERT-style encoders (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``, ``CamembertModel``)
    Blocks are ``encoder.layer.k``; ``"embeddings"`` splits after the
    embeddings. ``frozen(input_ids, attention_mask, token_type_ids, ...)``
    returns the per-token hidden states ``(batch, tokens, hidden)``;
    ``head(hidden_states, attention_mask)`` rebuilds the attention mask from
    the 0/1 padding mask exactly as the model does and returns the model's
    output type (``last_hidden_state``, ``pooler_output``).
sentence-transformers models whose first module wraps such an encoder
    Blocks are ``0.model.encoder.layer.k`` (``0.auto_model.encoder.layer.k``
    is accepted too). ``frozen`` also takes the features dict of
    ``model.tokenize(texts)``; ``head(hidden_states, attention_mask)`` runs the
    remaining layers and the model's later modules (pooling, normalize, ...)
    and returns the sentence embedding tensor.

``at`` is a split point name (see :func:`split_points`) or a fraction in
``(0, 1]`` of the family's blocks to freeze: the first
``floor(at * n_blocks + 0.5)`` blocks (rounded half up) are frozen, so
``at=0.5`` recycles half of the encoder layers (or ResNet stages, or
Sequential children) and ``at=1.0`` freezes every block, leaving a head made
of the pooler / pooling modules / ``avgpool`` and ``fc`` only (for a plain
``nn.Sequential`` the head is then empty, the identity).

Any other model: write the two modules by hand, or capture the layer to
recycle with hooks (:mod:`actstore.models.capture`, precompute's ``layers=``).
"""

from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from actstore.models.capture import canonical_name

__all__ = [
    "BertFrozen",
    "BertHead",
    "ResNetPart",
    "SentenceTransformerHead",
    "split",
    "split_points",
]

# Hugging Face model types whose base model computes
# ``layer_k(hidden, mask)`` for every layer after the embeddings, with a
# bidirectional mask built from the 0/1 padding mask and nothing else between
# layers (checked in transformers 5.x's modeling files; RoBERTa-family
# embeddings derive position ids from padding, which ``frozen`` reproduces by
# calling the model's own embeddings).
_BERT_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})

_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_RESNET_ATTRS = (*_RESNET_STEM, *_RESNET_STAGES, "avgpool", "fc")

_FAMILIES = (
    "nn.Sequential; torchvision-style ResNet (conv1, bn1, relu, maxpool, layer1..layer4, "
    "avgpool, fc); Hugging Face BERT-style encoders (model types "
    f"{', '.join(sorted(_BERT_MODEL_TYPES))}, not decoders); sentence-transformers "
    "models whose first module wraps such an encoder"
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a model splits: its family, stem split points and block split points."""

    family: str
    stems: tuple[str, ...]
    blocks: tuple[str, ...]

    @property
    def points(self) -> list[str]:
        return [*self.stems, *self.blocks]


# -- family detection ------------------------------------------------------------


def _bert_rejection(module: Any) -> str | None:
    """Why ``module`` is not a supported BERT-style encoder; ``None`` if it is."""
    layers = getattr(getattr(module, "encoder", None), "layer", None)
    if not (isinstance(module, nn.Module) and hasattr(module, "embeddings")):
        return "it has no `embeddings` module"
    if not isinstance(layers, nn.ModuleList):
        return "it has no `encoder.layer` ModuleList"
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BERT_MODEL_TYPES:
        return (
            f"its model_type {model_type!r} has a BERT-like layout but is not known to run its layers exactly like BERT"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder (causal or cross-attention masks are not supported)"
    return None


def _sentence_transformer_encoder(model: Any) -> Any:
    """The BERT-style encoder of a sentence-transformers model, else ``None``."""
    if not isinstance(model, nn.Sequential) or type(model).forward is nn.Sequential.forward:
        return None
    if len(model) == 0:
        return None
    first = model[0]
    encoder = getattr(first, "auto_model", None)
    return encoder if isinstance(encoder, nn.Module) else None


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _unsupported(model: nn.Module, reason: str = "") -> TypeError:
    hint = ""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        prefix = getattr(model, "base_model_prefix", "") or "base_model"
        hint = f" It wraps a base model ({type(base).__name__}): split model.{prefix} and apply the task head yourself."
    why = f" ({reason})" if reason else ""
    return TypeError(
        f"split() does not know how to split a {type(model).__name__}{why}. Supported families: "
        f"{_FAMILIES}.{hint} To split another model, write the frozen and head modules by hand, "
        "or capture the layer to recycle with hooks (actstore.models.capture.capture / LayerCapture, "
        "precompute's layers=)."
    )


def _plan(obj: object) -> _Plan:
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(obj).__name__}")
    model: Any = obj  # layouts are duck-typed: attribute access is dynamic
    encoder = _sentence_transformer_encoder(model)
    if encoder is not None:
        reason = _bert_rejection(encoder)
        if reason is not None:
            raise _unsupported(model, f"its first module's auto_model is not split-able: {reason}")
        _check_sentence_transformer_module(model[0])
        prefix = canonical_name(model, "0.auto_model")
        if prefix is None:
            raise _unsupported(model, "its encoder is not a registered submodule")
        n = len(encoder.encoder.layer)
        return _Plan(
            "sentence-transformers",
            (f"{prefix}.embeddings",),
            tuple(f"{prefix}.encoder.layer.{i}" for i in range(n)),
        )
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):
        reason = _bert_rejection(model)
        if reason is not None:
            raise _unsupported(model, reason)
        n = len(model.encoder.layer)
        return _Plan("bert", ("embeddings",), tuple(f"encoder.layer.{i}" for i in range(n)))
    if all(isinstance(getattr(model, a, None), nn.Module) for a in _RESNET_ATTRS):
        return _Plan("resnet", ("maxpool",), _RESNET_STAGES)
    if _plain_sequential(model):
        if len(model) == 0:
            raise ValueError("cannot split an empty nn.Sequential")
        return _Plan("sequential", (), tuple(name for name, _ in model.named_children()))
    raise _unsupported(model)


def _check_sentence_transformer_module(first: nn.Module) -> None:
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


# -- split point resolution --------------------------------------------------------


def split_points(model: nn.Module) -> list[str]:
    """The valid split point names of ``model``, shallowest first.

    Parameters
    ----------
    model : torch.nn.Module
        A model of a supported family (see the module docstring).

    Returns
    -------
    list of str
        Stem points (``"embeddings"``, ``"maxpool"``) then one point per block.
        Nested paths into a ``nn.Sequential`` child (``"2.1"``) are accepted by
        :func:`split` too but are not listed.

    Raises
    ------
    TypeError
        The model belongs to no supported family.

    Examples
    --------
    >>> from torch import nn
    >>> split_points(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    ['0', '1', '2']
    """
    return _plan(model).points


def _nested_sequential_ok(model: nn.Module, name: str) -> bool:
    """Whether ``name`` walks only through plain ``nn.Sequential`` containers."""
    module = model
    for part in name.split("."):
        if not _plain_sequential(module) or part not in module._modules:
            return False
        child = module._modules[part]
        if child is None:
            return False
        module = child
    return True


def _resolve_at(model: nn.Module, plan: _Plan, at: object) -> str:
    if isinstance(at, int):  # bool included
        raise TypeError(
            f"at must be a split point name (str) or a fraction (float) in (0, 1]; got {at!r}. "
            f"Use at={int(at) / len(plan.blocks):.4g} to freeze {int(at)} of {len(plan.blocks)} blocks, or "
            f"a name from {plan.points}."
        )
    if isinstance(at, float):
        return _from_fraction(plan, at)
    if not isinstance(at, str):
        raise TypeError(f"at must be a split point name (str) or a fraction (float); got {type(at).__name__}")
    name = canonical_name(model, at)
    if name is not None and name in plan.points:
        return name
    if plan.family == "sequential" and name is not None and _nested_sequential_ok(model, name):
        return name
    listing = f"Valid split points of this {plan.family} model: {plan.points}."
    if name is None:
        close = difflib.get_close_matches(at, plan.points, n=3, cutoff=0.6)
        hint = f" Close matches: {', '.join(map(repr, close))}." if close else ""
        raise ValueError(f"{type(model).__name__} has no module named {at!r}.{hint} {listing}")
    inside = [p for p in plan.points if name.startswith(p + ".")]
    where = f" is inside block {inside[-1]!r}" if inside else " is not a block boundary"
    raise ValueError(
        f"cannot split {type(model).__name__} at {at!r}: it{where}. Splits must be at block boundaries. {listing}"
    )


def _from_fraction(plan: _Plan, fraction: float) -> str:
    n = len(plan.blocks)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(
            f"at={fraction!r}: a fraction of blocks to freeze must lie in (0, 1]; "
            f"or pass a split point name from {plan.points}"
        )
    k = math.floor(fraction * n + 0.5)
    if k < 1:
        stem = f", or the stem split point {plan.stems[0]!r}" if plan.stems else ""
        raise ValueError(
            f"at={fraction!r} freezes floor({fraction!r} * {n} + 0.5) = 0 of the {n} blocks; "
            f"use at >= {1 / (2 * n):.4g} to freeze at least one block{stem}"
        )
    return plan.blocks[k - 1]


# -- BERT-style encoders -------------------------------------------------------------


def _attention_mask(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
    """Build the mask the encoder layers take, as the model's forward does.

    transformers 5.x builds it with ``masking_utils.create_bidirectional_mask``,
    whose format depends on ``config._attn_implementation`` (an additive float
    mask for eager attention, a boolean mask or ``None`` for SDPA). Older
    versions take the additive ``(batch, 1, 1, tokens)`` extended mask.
    """
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            "attention_mask must be the 0/1 padding mask of shape (batch, tokens) = "
            f"{tuple(hidden.shape[:2])}; got shape {tuple(attention_mask.shape)}"
        )
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x (not exercised by the tests here)
        if attention_mask is None:
            return None
        extended = attention_mask[:, None, None, :].to(hidden.dtype)
        return (1.0 - extended) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def _run_layers(layers: nn.ModuleDict, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
    for layer in layers.values():
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out  # 4.x layers return a tuple
    return hidden


def _layer_dict(encoder: Any, indices: range) -> nn.ModuleDict:
    """The shared layers ``indices`` keyed by their original index."""
    return nn.ModuleDict({str(i): encoder.encoder.layer[i] for i in indices})


_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


class BertFrozen(nn.Module):
    """Embeddings and encoder layers ``0..k`` of a BERT-style encoder (shared).

    Attributes
    ----------
    embeddings : torch.nn.Module
        The model's embeddings module.
    layer : torch.nn.ModuleDict
        The frozen layers, keyed by their index in ``encoder.layer``.
    at : str
        The split point: the module whose output ``forward`` returns.
    """

    def __init__(self, encoder: Any, k: int, at: str) -> None:
        super().__init__()
        self.embeddings: nn.Module = encoder.embeddings
        self.layer = _layer_dict(encoder, range(k + 1))
        self.config = encoder.config
        self.at = at

    def forward(
        self,
        input_ids: torch.Tensor | Mapping[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the hidden states after block ``at``, shape (batch, tokens, hidden).

        ``input_ids`` may instead be a mapping holding these arguments (a
        tokenizer's ``BatchEncoding`` or sentence-transformers' features
        dict); other keys are ignored.
        """
        if isinstance(input_ids, Mapping):
            features = input_ids
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds = (
                features.get(key) for key in _FEATURE_KEYS
            )
        hidden = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        mask = _attention_mask(self.config, hidden, attention_mask)
        return _run_layers(self.layer, hidden, mask)


class BertHead(nn.Module):
    """Encoder layers ``k+1..`` (and the pooler) of a BERT-style encoder (shared).

    ``forward(hidden_states, attention_mask=None)`` rebuilds the attention mask
    from the 0/1 padding mask as the model does, runs the remaining layers and
    the pooler, and returns a ``BaseModelOutputWithPoolingAndCrossAttentions``
    like the model (``pooler_output`` is ``None`` without a pooler).
    ``hidden_states`` of another floating dtype (a float16 store) is cast to
    the dtype of the head's parameters (if it has any).
    """

    def __init__(self, encoder: Any, k: int, at: str, pooler: bool = True) -> None:
        super().__init__()
        self.layer = _layer_dict(encoder, range(k + 1, len(encoder.encoder.layer)))
        self.pooler: nn.Module | None = getattr(encoder, "pooler", None) if pooler else None
        self.config = encoder.config
        self.at = at

    def _cast(self, hidden: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters(), None)
        if param is not None and hidden.is_floating_point() and hidden.dtype != param.dtype:
            return hidden.to(param.dtype)
        return hidden

    def encode(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the remaining layers; return the last hidden states (no pooler)."""
        hidden = self._cast(hidden_states)
        mask = _attention_mask(self.config, hidden, attention_mask)
        return _run_layers(self.layer, hidden, mask)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        last = self.encode(hidden_states, attention_mask)
        pooled = self.pooler(last) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=last, pooler_output=pooled)


class SentenceTransformerHead(nn.Module):
    """The upper encoder layers plus a sentence-transformers model's later modules.

    ``forward(hidden_states, attention_mask=None)`` runs encoder layers
    ``k+1..``, then every module after the first (pooling, normalize, dense,
    ...) on the features dict ``{"token_embeddings", "attention_mask"}``, and
    returns ``features["sentence_embedding"]``. Features the model's first
    module would add besides these (a ``prompt_length`` for pooling that
    excludes prompts, ``all_layer_embeddings``) are not available.
    """

    def __init__(self, model: Any, k: int, at: str) -> None:
        super().__init__()
        self.encoder = BertHead(model[0].auto_model, k, at, pooler=False)
        self.modules_after = nn.Sequential(OrderedDict(list(model.named_children())[1:]))
        self.at = at

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        features: dict[str, Any] = {"token_embeddings": self.encoder.encode(hidden_states, attention_mask)}
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


# -- ResNet ----------------------------------------------------------------------------


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


# -- nn.Sequential ---------------------------------------------------------------------


def _split_sequential(seq: nn.Sequential, path: list[str]) -> tuple[nn.Sequential, nn.Sequential]:
    children = list(seq.named_children())
    names = [name for name, _ in children]
    i = names.index(path[0])
    frozen = OrderedDict(children[:i])
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if len(path) == 1:
        frozen[path[0]] = children[i][1]
    else:
        inner = cast(nn.Sequential, children[i][1])  # checked by _nested_sequential_ok
        inner_frozen, inner_head = _split_sequential(inner, path[1:])
        frozen[path[0]] = inner_frozen
        if len(inner_head) > 0:
            head[path[0]] = inner_head
    head.update(children[i + 1 :])
    return nn.Sequential(frozen), nn.Sequential(head)


# -- entry point -----------------------------------------------------------------------


def split(model: nn.Module, at: str | float) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` into ``(frozen, head)`` at a block boundary.

    Parameters
    ----------
    model : torch.nn.Module
        A model of a supported family (see the module docstring).
    at : str or float
        A split point from :func:`split_points` (the last frozen block; for
        sentence-transformers the ``auto_model`` alias is accepted), or a
        fraction in ``(0, 1]`` of the blocks to freeze: the first
        ``floor(at * n_blocks + 0.5)`` blocks, at least one. ``1.0`` freezes
        every block and leaves a pooling/classifier-only head.

    Returns
    -------
    (frozen, head) : tuple of torch.nn.Module
        ``head(frozen(x))`` equals ``model(x)`` to float tolerance. For
        BERT-style encoders the call is ``head(frozen(**batch),
        batch["attention_mask"])``. Both share ``model``'s submodules and
        parameters (never copied) and carry the resolved split name as
        ``.at`` (``nn.Sequential`` parts excepted). Neither is put in eval
        mode or frozen for you.

    Raises
    ------
    ValueError
        ``at`` names no module, names a module inside a block or otherwise
        off a block boundary, or is a fraction outside ``(0, 1]`` or too small
        to freeze one block; the message lists the valid split points.
    TypeError
        ``model`` belongs to no supported family (the message says how to
        split by hand), or ``at`` is neither a str nor a float.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> frozen, head = split(model, "1")
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(head(frozen(x)), model(x))
    True
    """
    plan = _plan(model)
    name = _resolve_at(model, plan, at)
    if plan.family == "sequential":
        return _split_sequential(cast(nn.Sequential, model), name.split("."))
    if plan.family == "resnet":
        n = plan.blocks.index(name) + 1 if name in plan.blocks else 0
        frozen_names = (*_RESNET_STEM, *_RESNET_STAGES[:n])
        return ResNetPart(model, frozen_names, name), ResNetPart(model, (*_RESNET_STAGES[n:], "avgpool", "fc"), name)
    k = plan.blocks.index(name) if name in plan.blocks else -1
    if plan.family == "bert":
        return BertFrozen(model, k, name), BertHead(model, k, name)
    st = cast(nn.Sequential, model)
    return BertFrozen(st[0].auto_model, k, name), SentenceTransformerHead(st, k, name)
