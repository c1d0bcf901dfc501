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
Hugging Face task models around such a base model (``*ForSequenceClassification``, ``*ForTokenClassification``, ``*ForQuestionAnswering``, ``*ForCausalLM``, ``ViTForImageClassification``, ...)
    Cut through the base model (``bert.encoder.layer.1``): the frozen part
    is the base model's (same states and fingerprint); the head
    (:class:`~actstore.models.task.TaskHead`) runs the task model's own
    forward, so ``head(states, labels=...)`` returns its output type with
    its loss (see :mod:`actstore.models.task` for what it refuses).
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

Padding: with right padding (every tokenizer's default for these models) and
default position ids, a sample's states do not depend on how its batch was
padded, so recycled rows are batch-independent. Left padding shifts the
positions of the real tokens where a model counts them from the row's first
token (BERT, DistilBERT, GPT-2, the rotary decoders): ``head(frozen(x))``
still equals ``model(x)`` for that batch, but the rows differ from the
unpadded sample's, so :func:`check_padding` (used by precompute and
RecycledEncoder) refuses such batches per family; :func:`check_batch` also
refuses non-default ``position_ids`` that the head would need
(:func:`head_arguments`) for a store.

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
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from actstore.deprecation import moved_attributes
from actstore.errors import SplitError
from actstore.models.blocks import Frozen, Head, SplitStates
from actstore.models.capture import canonical_name
from actstore.models.checks import left_padding_error, needed_arguments, refuse_arguments, refuse_mask_holes
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
    "check_batch",
    "attends_both_ways",
    "check_padding",
    "head_arguments",
    "plan_split",
    "resolve_at",
    "split",
    "split_points",
    "wrapped_base",
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


def wrapped_base(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, base)`` of a Hugging Face task model (``BertForSequenceClassification``: ``("bert.", model.bert)``)
    whose base model ``split`` knows, else ``None``.

    A task model's forward runs its base model on the inputs first and its task
    modules (classifier, LM head) on the base model's output, so a layer inside
    the base model is computed by the base model's modules alone.
    """
    if isinstance(model, (Frozen, Head)):
        return None
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(prefix, str) or not prefix:
        return None
    base = getattr(model, prefix, None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    try:
        plan_split(base)
    except (TypeError, ValueError):
        return None
    return prefix + ".", base


def attends_both_ways(model: nn.Module) -> bool:
    """Whether ``model`` is of a family ``split`` knows whose tokens attend to later tokens too (an encoder: BERT,
    RoBERTa, ViT), so that without a mask a token's state depends on the padding after it.  False for causal
    decoders and for models of no known family (nothing is known of them)."""
    found = _layout_of(model)
    return found is not None and not found[0].causal


def _layout_of(model: nn.Module) -> tuple[BlockLayout, nn.Module] | None:
    """The block layout of ``model`` (a frozen part, a model ``split`` knows, or a task model around one) and the
    module it describes; ``None`` when there is none."""
    if isinstance(model, (Frozen, Head)):
        return model.layout, model.__dict__["base"]
    try:
        plan = plan_split(model)
    except (TypeError, ValueError):
        wrapped = wrapped_base(model)
        if wrapped is None:
            return None
        plan = plan_split(wrapped[1])
    if plan.layout is None or plan.base is None:
        return None
    return plan.layout, plan.base


def _named(base: nn.Module) -> str:
    return f"a {type(base).__name__}"


def _pad_id(base: nn.Module) -> int | None:
    embeddings = getattr(base, "embeddings", None)
    pad = getattr(embeddings, "padding_idx", None)
    if pad is None:
        pad = getattr(getattr(base, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def check_padding(model: nn.Module, attention_mask: torch.Tensor | Mapping[str, Any] | None,
                  input_ids: torch.Tensor | None = None) -> None:
    """Refuse a left-padded batch for a model whose states then depend on the padding.

    Decided per family (a test compares every family's left-padded rows with
    the unpadded samples'): BERT, DistilBERT, DeBERTa-v2 with absolute positions
    (``position_biased_input``), GPT-2, Llama, Mistral and Qwen2 count position
    ids from the first token of the batch row, so padding before a sample
    shifts its positions and its rows would differ from the sample's own (for
    rotary decoders by rounding only, refused all the same). RoBERTa, XLM-R and
    CamemBERT count positions over the tokens that are not the pad id: allowed
    when ``input_ids`` are given and their padding holds that id (what a
    tokenizer does). T5, DeBERTa-v2 with relative positions only, ViT and
    custom modules are not refused. Right padding is never refused.

    Parameters
    ----------
    model : torch.nn.Module
        The model (a task model around a known base model too) or its frozen part.
    attention_mask : torch.Tensor, Mapping or None
        The batch's 0/1 mask, or the batch itself (its ``attention_mask`` and ``input_ids`` are read).
    input_ids : torch.Tensor, optional
        The batch's token ids (needed to allow left padding for RoBERTa-style positions).

    Raises
    ------
    LeftPaddingError
        A row has a padding token before a real one and the model's positions shift with it.
    """
    if isinstance(attention_mask, Mapping):
        batch = attention_mask
        attention_mask, input_ids = batch.get("attention_mask"), batch.get("input_ids", input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        return
    found = _layout_of(model)
    if found is None:
        return
    layout, base = found
    if attention_mask.ndim == 2:
        refuse_mask_holes((attention_mask != 0).cpu().numpy())
    error = left_padding_error(layout, attention_mask, input_ids, _pad_id(base), _named(base))
    if error is not None:
        raise error


def head_arguments(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The forward arguments of ``batch`` that the head needs besides the states and the mask.

    Non-default ``position_ids`` (packed sequences, offsets) of a model whose
    blocks after the cut read them (rotary decoders always; BERT, RoBERTa and
    GPT-2 when no ``attention_mask`` is given); empty otherwise. The live pair
    carries them (``head(frozen(**batch))``); a store of the frozen part's
    states does not, so precompute refuses such a batch (:func:`check_batch`).

    Examples
    --------
    >>> from torch import nn
    >>> head_arguments(nn.Sequential(nn.Linear(2, 2)), {"position_ids": None})
    {}
    """
    found = _layout_of(model)
    return {} if found is None else needed_arguments(found[0], batch)


def check_batch(model: nn.Module, batch: Any) -> None:
    """Refuse a batch whose stored rows would not be its samples' own, or not all the head needs.

    For precompute (and anything else that stores the frozen part's states):
    :func:`check_padding` on the batch's ``attention_mask`` and ``input_ids``,
    then non-default ``position_ids`` the head would need (:func:`head_arguments`).
    A batch that is not a mapping is not checked.

    Raises
    ------
    LeftPaddingError
        See :func:`check_padding`.
    HeadInputError
        The batch's ``position_ids`` are not the default and the blocks after the cut read them.
    """
    if not isinstance(batch, Mapping):
        return
    found = _layout_of(model)
    if found is None:
        return
    layout, base = found
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        refuse_mask_holes((mask != 0).cpu().numpy())
    error = left_padding_error(layout, batch.get("attention_mask"), batch.get("input_ids"), _pad_id(base),
                               _named(base))
    if error is not None:
        raise error
    refuse_arguments(layout, batch, _named(base))


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
        n = len(plan.blocks)
        fits = 0 < int(at) <= n and not isinstance(at, bool)
        way = (f"Use at={int(at) / n:.4g} to freeze {int(at)} of {n} blocks, or a name from {plan.points}." if fits
               else f"Freeze 1 to {n} blocks (at=1/{n} .. 1.0), or name a split point from {plan.points}; to freeze "
                    "no block, do not split or recycle the model.")
        raise TypeError(f"at must be a split point name (str) or a fraction (float) in (0, 1]; got {at!r}. {way}")
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
