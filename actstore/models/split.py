"""Split a model into a frozen part and a trainable head at a block boundary.

``frozen, head = split(model, at)`` gives two modules such that
``head(frozen(x))`` computes ``model(x)``: ``frozen`` runs the model up to and
including the block ``at``, ``head`` runs the rest. Both hold the original
submodules (parameters are shared, never copied), so training ``head`` trains
``model``'s upper layers, and the output of ``frozen`` is what a store of
recycled activations holds (``precompute(model, ..., layers=frozen.at)``).

Supported families (detected from the module layout and ``config.model_type``):

``nn.Sequential`` (its own ``forward``)
    Blocks are the top-level children; ``at`` is a child name (``"3"``) or a
    path into nested plain ``nn.Sequential`` children (``"2.1"``). Both parts
    are ``nn.Sequential`` keeping the children's names.
torchvision-style ResNet (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``)
    Blocks are the stages ``layer1``..``layer4``; ``"maxpool"`` splits after
    the stem. The head replays torchvision's ``ResNet.forward`` order.
Hugging Face base models: BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, DeBERTa-v2, GPT-2, Llama, Mistral, Qwen2, the T5 encoder (``T5EncoderModel``), ViT
    Blocks are the model's layer list (``encoder.layer.k``, ``h.k``,
    ``layers.k``, ``encoder.block.k``, ``transformer.layer.k``); the stem
    split point (``"embeddings"``, ``"drop"``, ``"embed_tokens"``,
    ``"encoder.embed_tokens"``) splits before block 0. One mechanism serves them all
    (:mod:`actstore.models.blocks`): the frozen part is the model's own
    forward stopped after block ``k``; the head is the model's own forward
    with the stem and blocks ``0..k`` standing in for the cached states, so
    the model itself builds its causal / padding masks, rotary embeddings,
    T5's relative position bias and ViT's layout. ``frozen(**batch)`` returns
    :class:`~actstore.models.blocks.SplitStates` (the states, carrying the
    batch's ``attention_mask``); ``head(states)`` / ``head(states, mask)`` /
    ``head(padded_batch)`` / ``head({"hidden_states": ..., "attention_mask":
    ...})`` returns the model's own output type.
sentence-transformers models whose first module wraps such an encoder
    Blocks are ``0.model.<blocks>.k`` (``0.auto_model...`` is accepted too).
    ``frozen`` also takes the features dict of ``model.tokenize(texts)``;
    the head runs the remaining layers and the model's later modules
    (pooling, normalize, ...) and returns the sentence embedding tensor.
Any other module, by protocol: ``split(model, at, blocks="layers", stem="embed")``
    ``blocks`` names the ``nn.ModuleList`` whose children ``model.forward``
    calls in order, each taking the residual stream as its first argument
    and returning it (or a tuple that starts with it); ``stem`` names the
    module whose output enters block 0 (the head's call replaces it, so the
    head is ``model.forward(states)``); ``tail`` names the modules after the
    blocks (default: the other top-level children). A forward that adds a
    block's output to the stream itself (blocks returning the branch) is
    detected and refused, never captured silently wrong.

Causal models and padding: with right padding (every tokenizer's default for
these models) and default position ids, a sample's states do not depend on
how its batch was padded, so recycled rows are batch-independent. Left
padding shifts the positions of the real tokens: ``head(frozen(x))`` still
equals ``model(x)`` for that batch, but the rows differ from the unpadded
sample's, so :func:`check_padding` (used by precompute and RecycledEncoder)
refuses left-padded batches for causal decoders.

``at`` is a split point name (see :func:`split_points`) or a fraction in
``(0, 1]`` of the family's blocks to freeze: the first
``floor(at * n_blocks + 0.5)`` blocks (rounded half up) are frozen, so
``at=0.5`` recycles half of the layers and ``at=1.0`` freezes every block,
leaving a head made of the final norm / pooler / pooling modules only (for a
plain ``nn.Sequential`` the head is then empty, the identity).
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

from actstore.errors import LeftPaddingError
from actstore.models.blocks import Frozen, Head, SplitError, SplitStates, head_inputs
from actstore.models.capture import canonical_name
from actstore.models.families import KNOWN_MODEL_TYPES, Family, _get, custom_family, detect_family

__all__ = [
    "BertFrozen",
    "BertHead",
    "Frozen",
    "Head",
    "ResNetPart",
    "SentenceTransformerHead",
    "SplitError",
    "SplitStates",
    "check_padding",
    "split",
    "split_points",
]

_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_RESNET_ATTRS = (*_RESNET_STEM, *_RESNET_STAGES, "avgpool", "fc")

_FAMILIES = (
    "nn.Sequential; torchvision-style ResNet (conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc); "
    f"Hugging Face base models of types {', '.join(KNOWN_MODEL_TYPES)}; sentence-transformers models whose "
    "first module wraps such an encoder"
)

_PROTOCOL = (
    "To split another module, name its block container: split(model, at, blocks='layers', stem='embed') "
    "(blocks: the nn.ModuleList that forward() runs in order on the residual stream; stem: the module whose "
    "output enters the first block), or write the frozen and head modules by hand, or capture the layer to "
    "recycle with hooks (actstore.models.capture.capture / LayerCapture, precompute's layers=)."
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a model splits: its family, stem split points and block split points (full names)."""

    family: str
    stems: tuple[str, ...]
    blocks: tuple[str, ...]
    spec: Family | None = None
    base: nn.Module | None = None
    prefix: str = ""

    @property
    def points(self) -> list[str]:
        return [*self.stems, *self.blocks]


# -- family detection ------------------------------------------------------------


def _sentence_transformer_encoder(model: Any) -> Any:
    """The Hugging Face encoder of a sentence-transformers model, else ``None``."""
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
        if _tied_output(model):
            hint += (" Its output layer shares its weight with the input embedding, which belongs to the frozen "
                     "part: give the task head its own copy (out = model.get_output_embeddings(); out.weight = "
                     "torch.nn.Parameter(out.weight.detach().clone())) or keep it frozen, or training it makes "
                     "the stored activations stale.")
    why = f" ({reason})" if reason else ""
    return SplitError(f"split() does not know how to split a {type(model).__name__}{why}. Supported families: "
                      f"{_FAMILIES}.{hint} {_PROTOCOL}")


def _tied_output(model: Any) -> bool:
    """Whether a task model's output layer shares its weight with its input embedding (GPT-2's LM head)."""
    try:
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and emb is not None and getattr(out, "weight", None) is getattr(emb, "weight", 0)


def _block_plan(model: nn.Module, spec: Family, base: nn.Module, prefix: str) -> _Plan:
    n = len(spec.block_list(base))
    stems = (f"{prefix}{spec.stem_point}",) if spec.stem_point else ()
    name = "sentence-transformers" if prefix else spec.name
    return _Plan(name, stems, tuple(f"{prefix}{spec.blocks}.{i}" for i in range(n)), spec, base, prefix)


def _plan(obj: object, blocks: str | None = None, stem: str | None = None, tail: tuple[str, ...] = ()) -> _Plan:
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(obj).__name__}")
    model: Any = obj  # layouts are duck-typed: attribute access is dynamic
    if blocks is not None:
        return _block_plan(model, custom_family(model, blocks, stem, tail), model, "")
    encoder = _sentence_transformer_encoder(model)
    if encoder is not None:
        spec = detect_family(encoder)
        if isinstance(spec, str) or spec.feed != "inputs_embeds":
            raise _unsupported(model, f"its first module's auto_model is not split-able: {spec}")
        _check_sentence_transformer_module(model[0])
        prefix = canonical_name(model, "0.auto_model")
        if prefix is None:
            raise _unsupported(model, "its encoder is not a registered submodule")
        return _block_plan(model, spec, encoder, prefix + ".")
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        spec = detect_family(model)
        if isinstance(spec, str):
            raise _unsupported(model, spec)
        return _block_plan(model, spec, model, "")
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


def check_padding(model: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Refuse a left-padded batch for a causal decoder, whose states then depend on the padding.

    GPT-2, Llama, Mistral and Qwen2 count position ids from the first token of
    the batch row (the default ``position_ids``): padding before a sample
    shifts its positions, so rows recycled from a left-padded batch would
    differ from the sample's own and from the same sample in another batch.
    With right padding (the tokenizer's ``padding_side = "right"``) causal
    attention never sees the padding and the rows are the sample's own.
    Encoders are not refused here (BERT-style absolute positions shift too,
    but bidirectional encoders are conventionally right-padded; RoBERTa and
    T5 are unaffected).

    Raises
    ------
    LeftPaddingError
        A row of ``attention_mask`` has a padding token before a real one.
    """
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] < 2:
        return
    if isinstance(model, Frozen):
        spec: Family | None = model.family
    else:
        try:
            spec = _plan(model).spec
        except (TypeError, ValueError):
            return
    if spec is None or not spec.causal:
        return
    real = attention_mask != 0
    bad = (~real[:, :-1] & real[:, 1:]).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise LeftPaddingError(
            f"the batch is left-padded (rows {rows} have padding before real tokens): for a "
            f"{spec.name} model that shifts the positions of the real tokens, so their recycled states "
            "would depend on the batch. Pad on the right (tokenizer.padding_side = 'right', the default for "
            "these models); the stored rows are then the samples' own."
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


# -- transformers: the generic mechanism (actstore.models.blocks) -------------------------------


BertFrozen = Frozen
"""The frozen part of every transformer family (kept under its former name)."""

BertHead = Head
"""The head of every transformer family (kept under its former name)."""


class SentenceTransformerHead(nn.Module):
    """The upper encoder layers plus a sentence-transformers model's later modules.

    ``forward`` takes the states in any form the transformer head takes (see
    :func:`actstore.models.blocks.head_inputs`), runs encoder layers ``k+1..``,
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
        states, attention_mask = head_inputs(args, kwargs)
        out = self.encoder.run(states, attention_mask)
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


def _walk(base: nn.Module, family: Family, tail: tuple[str, ...]) -> dict[str, nn.Module]:
    """The modules of ``base`` outside the blocks and the tail, shallowest names (the frozen part's own)."""
    owned: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == family.blocks or path in tail:
                continue
            if family.blocks.startswith(path + ".") or any(t.startswith(path + ".") for t in tail):
                visit(child, path + ".")
            else:
                owned[path] = child

    visit(base, "")
    return owned


def _tail(base: nn.Module, family: Family) -> tuple[str, ...]:
    if family.name != "custom" or family.tail:
        return tuple(t for t in family.tail if isinstance(_try_get(base, t), nn.Module))
    top = family.blocks.split(".")[0]
    return tuple(n for n, _ in base.named_children() if n != top and n != family.stem_point)


def _try_get(module: nn.Module, path: str) -> Any:
    try:
        return _get(module, path)
    except AttributeError:
        return None


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


def _split_blocks(root: nn.Module, base: nn.Module, family: Family, prefix: str, name: str,
                  untie: bool) -> tuple[Frozen, Head]:
    """Frozen part and head of a block-structured model at the full split point ``name``."""
    local = name[len(prefix):] if prefix else name
    blocks = family.blocks
    k = int(local[len(blocks) + 1:]) if local.startswith(blocks + ".") else -1
    tail = _tail(base, family)
    owned = _walk(base, family, tail)
    frozen = Frozen(base, family, k, name, local, owned)
    frozen.__dict__["root"] = root  # the model that was split (for the fingerprint of older stores)
    head = Head(base, family, k, name, {t: _get(base, t) for t in tail})
    _check_untied(frozen, head, untie)
    return frozen, head


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


def split(model: nn.Module, at: str | float, *, blocks: str | None = None, stem: str | None = None,
          tail: tuple[str, ...] | list[str] = (), untie_weights: bool = False) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` into ``(frozen, head)`` at a block boundary.

    Parameters
    ----------
    model : torch.nn.Module
        A model of a supported family (see the module docstring), or any
        module when ``blocks`` is given.
    at : str or float
        A split point from :func:`split_points` (the last frozen block; for
        sentence-transformers the ``auto_model`` alias is accepted), or a
        fraction in ``(0, 1]`` of the blocks to freeze: the first
        ``floor(at * n_blocks + 0.5)`` blocks, at least one. ``1.0`` freezes
        every block and leaves a norm/pooler/classifier-only head.
    blocks, stem, tail : optional
        The protocol for a module split does not know (module docstring):
        the block container's name, the module whose output enters block 0,
        and the modules after the blocks.
    untie_weights : bool
        When the head shares a weight with the frozen part (an LM head tied
        to the input embedding), give the head its own copy (the model is
        untied) instead of raising :class:`SplitError`.

    Returns
    -------
    (frozen, head) : tuple of torch.nn.Module
        ``head(frozen(x))`` equals ``model(x)`` to float tolerance, padded
        batches included (the frozen part's output carries the mask). Both
        share ``model``'s submodules and parameters (never copied) and carry
        the resolved split name as ``.at`` (``nn.Sequential`` parts excepted).
        Neither is put in eval mode or frozen for you.

    Raises
    ------
    ValueError
        ``at`` names no module, names a module inside a block or otherwise
        off a block boundary, or is a fraction outside ``(0, 1]`` or too small
        to freeze one block; the message lists the valid split points.
    SplitError
        ``model`` belongs to no supported family (a ``TypeError``; the message
        gives the protocol), the head would share weights with the frozen part,
        or (raised by the parts when run) the blocks do not return the stream.
    TypeError
        ``at`` is neither a str nor a float.

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
    plan = _plan(model, blocks, stem, tuple(tail))
    name = _resolve_at(model, plan, at)
    if plan.family == "sequential":
        return _split_sequential(cast(nn.Sequential, model), name.split("."))
    if plan.family == "resnet":
        n = plan.blocks.index(name) + 1 if name in plan.blocks else 0
        frozen_names = (*_RESNET_STEM, *_RESNET_STAGES[:n])
        return ResNetPart(model, frozen_names, name), ResNetPart(model, (*_RESNET_STAGES[n:], "avgpool", "fc"), name)
    if plan.spec is None or plan.base is None:  # every other family carries its table entry
        raise RuntimeError(f"split: no block layout recorded for the {plan.family} family")
    frozen, head = _split_blocks(model, plan.base, plan.spec, plan.prefix, name, untie_weights)
    if plan.family == "sentence-transformers":
        # The sentence embedding comes from the token states: an encoder pooler is in neither part.
        if "pooler" in head.tail:
            del head.tail["pooler"]
        return frozen, SentenceTransformerHead(model, head, name)
    return frozen, head
