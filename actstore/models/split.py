"""Split a model into a frozen part and a trainable head at a block boundary.

``frozen, head = split(model, at)`` gives two modules such that
``head(frozen(x))`` computes ``model(x)``: ``frozen`` runs the model up to and
including the block ``at``, ``head`` runs the rest. Both hold the original
submodules (parameters are shared, never copied), so training ``head`` trains
``model``'s upper layers, and the output of ``frozen`` is what a store of
recycled activations holds (``precompute(model, ..., layers=frozen.at)``).

Supported families (detected from the module layout and ``config.model_type``; each one is a module of
:mod:`actstore.models.families`, asked in the order of ``FAMILIES``):

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
from typing import Any

import torch
from torch import nn

from actstore.deprecation import moved_attributes
from actstore.errors import LeftPaddingError, SplitError
from actstore.models.blocks import Frozen, Head, SplitStates
from actstore.models.capture import canonical_name
from actstore.models.families import FAMILIES, CustomFamily, ResNetPart, SentenceTransformerHead, SplitPlan
from actstore.models.layout import BlockLayout

__all__ = [
    "Frozen",
    "Head",
    "ResNetPart",
    "SentenceTransformerHead",
    "SplitError",
    "SplitPlan",
    "SplitStates",
    "check_padding",
    "plan_split",
    "resolve_at",
    "split",
    "split_points",
]

# General to specific (the reverse of the detection order): the last entry refers to the one before it.
_FAMILIES = "; ".join(family.description for family in reversed(FAMILIES))

_PROTOCOL = (
    "To split another module, name its block container: split(model, at, blocks='layers', stem='embed') "
    "(blocks: the nn.ModuleList that forward() runs in order on the residual stream; stem: the module whose "
    "output enters the first block), or write the frozen and head modules by hand, or capture the layer to "
    "recycle with hooks (actstore.models.capture.capture / LayerCapture, precompute's layers=)."
)

#: Former names, kept importable: ``BertFrozen`` and ``BertHead`` serve every family (deprecated).
__getattr__ = moved_attributes(__name__, {
    "BertFrozen": ("actstore.models.split.Frozen (the same class)", lambda: Frozen),
    "BertHead": ("actstore.models.split.Head (the same class)", lambda: Head),
})


# -- family detection ------------------------------------------------------------


def _unsupported(model: nn.Module, reason: str = "") -> SplitError:
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


def plan_split(model: object, blocks: str | None = None, stem: str | None = None,
               tail: tuple[str, ...] = ()) -> SplitPlan:
    """How ``model`` splits: the family that detects it (or the protocol of ``blocks=``) and its split points.

    Raises
    ------
    SplitError
        No family detects ``model``, or the one that does cannot split it (the reason is in the message).
    TypeError, ValueError
        ``model`` is no ``nn.Module``; the ``blocks=`` protocol names are wrong; an empty ``nn.Sequential``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if blocks is not None:
        return CustomFamily(blocks, stem, tail).plan(model)
    family = next((f for f in FAMILIES if f.detect(model)), None)
    if family is None:
        raise _unsupported(model)
    plan = family.plan(model)
    if isinstance(plan, str):
        raise _unsupported(model, plan)
    return plan


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
        spec: BlockLayout | None = model.layout
    else:
        try:
            spec = plan_split(model).layout
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
    return plan_split(model).points


def resolve_at(model: nn.Module, plan: SplitPlan, at: object) -> str:
    """The registered name of the split point that ``at`` (a name or a fraction) designates.

    Raises ``ValueError`` listing the valid split points, ``TypeError`` for an ``at`` of another type.
    """
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
    if name is not None and plan.kind.accepts(model, plan, name):
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


def _from_fraction(plan: SplitPlan, fraction: float) -> str:
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
    plan = plan_split(model, blocks, stem, tuple(tail))
    return plan.kind.split(model, plan, resolve_at(model, plan, at), untie_weights=untie_weights)
