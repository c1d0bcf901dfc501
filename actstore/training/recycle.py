"""``actstore.recycle(model, at, store)``: the same model, its blocks up to ``at`` served from a store.

The routing happens at the block-structured base module (``model.bert`` of a
task model, a SentenceTransformer's encoder, the model itself for a base
model, a custom module under the ``blocks=`` protocol): its ``forward`` gets an
instance attribute (as accelerate's hooks do; ``__wrapped__`` keeps the
original signature visible) that

1. binds the call to the original signature and takes the model inputs it got
   (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``,
   ``pixel_values``, ``inputs_embeds``; a custom module's first argument),
2. keys each sample as precompute keys it (each sample's part of the batch,
   trimmed to its tokens: :func:`actstore.precompute.inputs.input_keys`),
3. looks the keys up, computes the misses with the frozen part (one forward over
   the missing samples, in eval mode, without grad) and appends them,
4. re-pads the rows into the batch's layout (its padding side and width; pad
   positions hold zeros), and
5. runs the base's original forward with the user's own arguments inside
   :func:`actstore.models.blocks.stand_ins`: the stem and blocks ``0..k``
   return the rows, everything else (masks, position embeddings, the blocks
   after the cut, the task head, the loss, pooling) is the library's code.

The model object itself is returned, its class swapped for a subclass of its
own class with the same name, module and qualified name (``isinstance``,
``save_pretrained``'s ``architectures`` and trainers' signature inspection see
the original) that adds :class:`RecycledModel`'s methods.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.errors import HeadInputError, SplitError
from actstore.models.blocks import Frozen, input_grad, stand_ins
from actstore.models.fingerprint import frozen_fingerprint
from actstore.models.split import check_batch, plan_split, resolve_at, wrapped_base
from actstore.precompute.inputs import input_keys
from actstore.store import ActivationStore
from actstore.training.collate import ActivationCollate
from actstore.training.outputs import output_rows
from actstore.training.recycle_store import RecycleStore
from actstore.training.recycle_util import (
    RecycledModel,
    Routing,
    features_hook,
    freeze,
    labels_hook,
    tied_across,
    untie,
)

__all__ = ["RecycledModel", "recycle", "unrecycle"]

#: The model inputs a routed forward keys (what reaches the frozen part), in this order.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "inputs_embeds")
_CACHES = ("past_key_values", "cache")
#: Arguments of the routed forward that leave the frozen part's output alone (the output flags are refused apart;
#: ``num_items_in_batch`` is the loss's, which transformers' task models pass down to their base).
_PASSED = frozenset({"return_dict", "use_cache", "output_attentions", "output_hidden_states", "num_items_in_batch"})
#: Arguments other than tensors that change what the frozen part computes (a tensor argument that is not keyed always
#: does: ``bool_masked_pos``, ``head_mask``, ``cache_position``); other plain values (sentence-transformers'
#: ``modality="text"``) pass.
_SHAPING = frozenset({"interpolate_pos_encoding"})


def _plan(model: nn.Module, at: str | float, blocks: str | None, stem: str | None,
          tail: Sequence[str]) -> tuple[Any, nn.Module, str, str]:
    """(plan, the planned module, the split point named in it, the planned module's prefix in ``model``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"recycle: model must be a torch.nn.Module; got {type(model).__name__}")
    outer = ""
    try:
        plan, planned = plan_split(model, blocks, stem, tuple(tail)), model
    except SplitError as e:
        wrapped = wrapped_base(model) if blocks is None else None
        if wrapped is None:
            raise SplitError(
                f"recycle cannot split a {type(model).__name__}: {e}. Name its blocks for the custom-module protocol: "
                "actstore.recycle(model, at, store, blocks='layers', stem='embed') (blocks: the nn.ModuleList that "
                "forward() runs in order on the residual stream)") from e
        outer, planned = wrapped
        plan = plan_split(planned)
    if plan.layout is None or plan.base is None:
        raise SplitError(
            f"recycle routes block-structured models; a {type(planned).__name__} ({plan.family}) has no block "
            "layout: use actstore.split + precompute, or name its blocks with blocks='...' (the custom protocol)")
    local = at[len(outer):] if isinstance(at, str) and outer and at.startswith(outer) else at
    return plan, planned, resolve_at(planned, plan, local), outer


def recycle(model: nn.Module, at: str | float, store: ActivationStore | str, *, blocks: str | None = None,
            stem: str | None = None, tail: Sequence[str] = (), untie_weights: bool = False, commit_every: int = 4096,
            max_rows: int | None = None, hit_rate_after: int | None = None, store_dtype: Any = None) -> nn.Module:
    """Route ``model``'s blocks up to ``at`` through ``store``: the same object, returned, its class a subclass.

    ``model(**batch)`` then takes exactly what it took and returns exactly what
    it returned (the loss too), with the stem and blocks up to ``at`` served
    from the store by the content key of each sample's inputs, misses computed
    (batched, without grad, the frozen part in eval mode) and appended.  The
    parameters of the frozen part stop requiring grad; every other parameter
    is the original's, so training the recycled model trains the model, and
    ``save_pretrained`` / ``save`` write a normal model.  Not thread-safe;
    ``torch.compile`` and generation with a key/value cache are not supported
    (``use_cache`` is turned off where the base takes it).

    Outputs at real positions equal the original model's (the frozen part run
    in eval mode); outputs at **pad** positions do not (their rows are zeros),
    so a token-level loss whose ``labels`` are not -100 at padding raises
    :class:`~actstore.errors.HeadInputError`.

    Parameters
    ----------
    model
        A Hugging Face model (base or task model: sequence / token
        classification, question answering, causal LM, image classification),
        a ``SentenceTransformer``, or any module with ``blocks=``.
    at
        The last frozen block: a split point name (of ``model`` or its base
        model) or a fraction of the blocks, as :func:`actstore.split`.
    store
        A path (a store is created on the first miss, with the precompute
        record naming ``at``) or an open :class:`~actstore.ActivationStore`
        (``mode="a"`` to append; read-only: misses are computed, not stored).
    blocks, stem, tail
        The custom-module protocol of :func:`actstore.split`.
    untie_weights
        A weight of the frozen part shared with a module after the cut (GPT-2's
        LM head and input embedding): give that module its own copy (the
        model's config says ``tie_word_embeddings=False``) instead of raising
        :class:`SplitError`.
    commit_every
        Commit every this many appended rows (also at ``close()`` and at
        garbage collection).
    max_rows
        Store at most this many rows; beyond, misses are computed and not stored (one warning).
    hit_rate_after
        After this many lookups (default: the store's rows when opened; for a
        store filled on the fly pass ``len(train_dataset)``; 0: never), a hit
        rate below 5% over the next as many lookups (at least 32) warns once
        (inputs that never repeat: random augmentation before the model).
    store_dtype
        dtype of a store created here (default: the frozen part's output dtype; exact).

    Returns
    -------
    torch.nn.Module
        ``model`` itself (the same object), now also a :class:`RecycledModel`:
        ``close()`` / a ``with`` block commit, release the store and give the
        plain class back (as :func:`unrecycle`), ``commit()``, ``hit_rate``,
        ``recycle_stats``.

    Raises
    ------
    SplitError
        ``model`` cannot be split (the message names ``blocks=``), is recycled
        already, or shares a weight across the cut without ``untie_weights=True``.
    StaleStoreError
        The store's rows were computed by another frozen part (a frozen weight
        changed, another split point); at a forward too when a frozen weight
        changed since ``recycle()`` or since the previous forward.
    StoreError
        The store holds another split point's or field's rows.
    ValueError, TypeError
        ``at`` names no split point; bad options.

    Examples
    --------
    >>> model = actstore.recycle(model, 0.5, "cache.store")  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # unchanged  # doctest: +SKIP
    >>> trainer.train(); model.close()  # doctest: +SKIP
    """
    if isinstance(model, RecycledModel):
        raise SplitError(f"recycle: this {type(model).__name__} is recycled already (store "
                         f"{model.__dict__['_actstore_recycle'].store.path}); call actstore.unrecycle(model) or "
                         "model.close() first")
    plan, planned, point, outer = _plan(model, at, blocks, stem, tail)
    frozen, _ = plan.kind.split(planned, plan, point, untie_weights=untie_weights)
    if not isinstance(frozen, Frozen):
        raise SplitError(f"recycle: the {plan.family} family gave no block-structured frozen part")
    tied = tied_across(model, frozen, untie_weights)  # refused before anything changes
    fp = frozen_fingerprint(frozen)
    local = point[len(plan.prefix):] if plan.prefix else point
    names = {outer + point, point, local}
    rs = RecycleStore(store, at=outer + point, names=names, model=model, fingerprint=fp, frozen=frozen,
                      commit_every=commit_every, max_rows=max_rows, store_dtype=store_dtype)
    untie(model, tied)
    routing = Routing(model, plan.base, plan.layout, frozen, rs, hit_rate_after, _route)
    freeze(routing)
    routing.hook = model.register_forward_pre_hook(labels_hook, with_kwargs=True)
    if plan.family == "sentence-transformers":  # key the features as they reach the model, as precompute does
        routing.features_hook = planned.register_forward_pre_hook(features_hook(routing), with_kwargs=True)
    routing.finalizer = weakref.finalize(model, _finish, rs)
    routing.release = unrecycle
    cls = type(model)
    sub = type(cls.__name__, (RecycledModel, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__,
                                                     "_actstore_plain": cls})
    object.__setattr__(model, "_actstore_recycle", routing)
    model.__class__ = sub
    _patch(routing)
    return model


def _finish(rs: RecycleStore) -> None:
    with contextlib.suppress(Exception):  # at garbage collection: never raise
        rs.close()


def _patch(routing: Routing) -> None:
    base = routing.base
    routing.saved = base.__dict__.get("forward")
    original = routing.saved if routing.saved is not None else type(base).forward.__get__(base)
    routing.original = original
    routing.signature = inspect.signature(original)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return routing.route(routing, args, kwargs)

    functools.update_wrapper(forward, original)
    routing.routed = forward
    base.forward = forward


def unrecycle(model: nn.Module) -> nn.Module:
    """Commit the store, release it, and give ``model`` its plain class and forward back; returns ``model``.

    The same object: its parameters (trained ones included) are untouched; the
    frozen part's parameters require grad again where they did before
    :func:`recycle`.  Raises :class:`TypeError` for a model that is not recycled.
    """
    if not isinstance(model, RecycledModel):
        raise TypeError(f"unrecycle: this {type(model).__name__} is not recycled (actstore.recycle returns the "
                        "models it routes)")
    routing: Routing = model.__dict__["_actstore_recycle"]
    base = routing.base
    routing.closed = True  # a wrapper set over the routed forward since (accelerate's) now calls the original
    if base.__dict__.get("forward") is routing.routed:
        if routing.saved is None:
            del base.__dict__["forward"]
        else:
            base.forward = routing.saved
    for hook in (routing.hook, routing.features_hook):
        if hook is not None:
            hook.remove()
    for p, flag in routing.grads:
        p.requires_grad_(flag)
    try:
        routing.rs.close()
    finally:
        if routing.finalizer is not None:
            routing.finalizer.detach()
        model.__class__ = type(model)._actstore_plain  # type: ignore[attr-defined]
        del model.__dict__["_actstore_recycle"]
    return model


# -- the routed forward ---------------------------------------------------------------------------


def _arguments(routing: Routing, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = routing.signature.bind_partial(*args, **kwargs).arguments
    params: dict[str, Any] = {}
    for name, value in bound.items():
        kind = routing.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD and isinstance(value, Mapping):
            params.update(value)
        else:
            params[name] = value
    return params


def _inputs(routing: Routing, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    if routing.layout.feed is None:  # a custom module: its first argument is the input
        first = next(iter(routing.signature.parameters), None)
        value = params.get(first) if first is not None else None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"recycle: {type(routing.base).__name__}.forward's first argument ({first}) must be the "
                            f"input tensor, got {type(value).__name__}")
        return {str(first): value}
    inputs = {k: params[k] for k in INPUT_NAMES if isinstance(params.get(k), torch.Tensor)}
    if not inputs:
        raise TypeError(f"recycle: {type(routing.base).__name__} got none of {list(INPUT_NAMES)}; "
                        f"it got {sorted(params)}")
    return inputs


def _route(routing: Routing, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if routing.computing or routing.closed:  # computing misses (the frozen part's own call), or unrecycled
        return routing.original(*args, **kwargs)
    params = _arguments(routing, args, kwargs)
    cached = [c for c in _CACHES if params.get(c) is not None]
    if cached:
        raise SplitError(f"recycle: the model got {cached[0]}=: a recycled model runs whole sequences without a "
                         "key/value cache; call actstore.unrecycle(model) to generate")
    config = getattr(routing.base, "config", None)
    asked = [k for k in ("output_hidden_states", "output_attentions")
             if params.get(k) or (params.get(k) is None and getattr(config, k, False) is True)]
    if asked:
        raise HeadInputError(
            f"recycle: {asked[0]}=True: the hidden states and attentions of the blocks up to the cut are not "
            "computed by a recycled model (its rows stand in for them), so they would not be the original's. Ask "
            "for them from the plain model (actstore.unrecycle(model)), or read the layers after the cut yourself "
            "with forward hooks")
    inputs = _inputs(routing, params)
    _check_call(routing, params, inputs)
    routing.check_fresh()
    if routing.layout.feed is not None:
        check_batch(routing.frozen, inputs)  # left padding; position ids a store cannot give back
    states = input_grad(routing.base, routing.layout, routing.frozen.k, _states(routing, inputs), routing.outer())
    if "use_cache" in routing.signature.parameters and routing.layout.use_cache:
        kwargs = {**kwargs, "use_cache": False}
    with stand_ins(routing.base, routing.layout, routing.frozen.k, states):
        return routing.original(*args, **kwargs)


def _check_call(routing: Routing, params: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    """Refuse a call the stored rows cannot answer as the unsplit model would: an argument that would change the
    frozen part's output but is not in the key (ViT's ``bool_masked_pos``, ``interpolate_pos_encoding=True``,
    ``head_mask``); a left-padded batch whose first positions (padding) a [CLS] head or pooler reads; an input
    whose gradient would flow back through the frozen blocks (a trainable soft prompt as ``inputs_embeds``)."""
    other = [k for k, v in params.items() if k not in inputs and k not in _PASSED
             and (isinstance(v, torch.Tensor) or (k in _SHAPING and v is not None and v is not False))]
    if other:
        raise HeadInputError(
            f"recycle: {type(routing.base).__name__} got {other[0]}={_short(params[other[0]])}, which may change what the "
            f"frozen blocks compute, but the stored rows are keyed by {sorted(inputs)} only, so a "
            "row computed without it would be served; call the plain model for such batches "
            "(actstore.unrecycle(model)), or leave it out")
    mask = inputs.get("attention_mask")
    if (mask is not None and mask.ndim == 2 and mask.shape[1] > 1 and not routing.layout.causal
            and bool((mask[:, 0] == 0).any()) and (reader := _first_token_reader(routing)) is not None):
        raise HeadInputError(
            f"recycle: a left-padded batch, and {reader} reads each row's first position, which is padding there: "
            "the unsplit model reads the state it computed from the pad token, a recycled one the zeros that stand "
            "in for padding at the cut, so the outputs would differ. Pad on the right "
            "(tokenizer.padding_side = 'right')")
    grads = [k for k, v in inputs.items() if v.requires_grad]
    if grads and torch.is_grad_enabled():
        raise HeadInputError(
            f"recycle: {grads[0]} requires grad, but its gradient would flow through the frozen blocks, which a "
            "recycled model does not run (their stored rows stand in for them), so it would get none; train it "
            "through the plain model (actstore.unrecycle(model)), or pass it detached")


#: Heads of encoder task models that read the first position ([CLS]) of every row.
_FIRST_TOKEN_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining")


def _first_token_reader(routing: Routing) -> str | None:
    """What of the recycled model reads each row's first position (a [CLS] pooling head, or the base model's
    ``pooler``), or None."""
    outer = routing.outer()
    name = type(outer).__name__
    if name.endswith(_FIRST_TOKEN_HEADS):
        return f"{name}'s head"
    pooler = getattr(routing.base, "pooler", None)
    if isinstance(pooler, nn.Module) and outer is routing.base:
        return f"{name}'s pooler (pooler_output; build it with add_pooling_layer=False if you do not use it)"
    return None


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)[:40]


def _states(routing: Routing, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's states at the split point: stored rows, appended rows and computed misses, in its layout."""
    rs = routing.rs
    first = next(iter(inputs.values()))
    n = int(first.shape[0])
    features, routing.features = routing.features, None
    if features is not None and _same_inputs(features, inputs, n):
        keys = input_keys(features, n)  # a SentenceTransformer's features dict: precompute's collate output
    else:
        keys = input_keys(inputs if len(inputs) > 1 else first, n)
    rows = rs.lookup(keys)
    if len(inputs) == 1 and features is None and (rows < 0).any():
        # One input: precompute keys a bare tensor batch as the tensor, a collate's dict as {name: tensor}.
        absent = np.flatnonzero(rows < 0)
        name = next(iter(inputs))
        rows[absent] = rs.lookup(input_keys({name: first[torch.as_tensor(absent, device=first.device)]}, len(absent)))
    extra: dict[int, torch.Tensor] = {}
    todo: dict[bytes, list[int]] = {}
    for p in np.flatnonzero(rows < 0).tolist():
        kb = bytes(keys[p])
        got = rs.pending.get(kb)
        if got is not None:
            extra[p] = got
        else:
            todo.setdefault(kb, []).append(p)
    routing.count(n, len(todo))
    if todo:
        miss = [ps[0] for ps in todo.values()]
        computed, ragged = _compute(routing, inputs, miss)
        for j, ps in enumerate(todo.values()):
            for p in ps:
                extra[p] = computed[j]
        rs.append(keys[miss], computed, ragged)
    snap = rs.store.snapshot if rs.store is not None else None
    gathered = ActivationCollate().gather(snap, rs.field, routing.field_of(extra), rows, extra=extra)
    param = next(routing.base.parameters(), None)
    device = param.device if param is not None else first.device
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return _layout(gathered, inputs.get("attention_mask"), first, device, dtype, rs.path)


def _same_inputs(features: dict[str, Any], inputs: dict[str, torch.Tensor], n: int) -> bool:
    """Whether the features a SentenceTransformer got are the ones its encoder got now (same tensors, same values)."""
    if any(isinstance(v, torch.Tensor) and (v.ndim == 0 or int(v.shape[0]) != n) for v in features.values()):
        return False
    shared = [k for k in inputs if k in features]
    if "input_ids" not in shared and "inputs_embeds" not in shared:
        return False
    for k in shared:
        a, b = features[k], inputs[k]
        if a is not b and (a.shape != b.shape or not torch.equal(a.to(b.device), b)):
            return False
    return True


def _compute(routing: Routing, inputs: dict[str, torch.Tensor], miss: list[int]) -> tuple[list[torch.Tensor], bool]:
    idx = torch.as_tensor(miss, dtype=torch.long)
    sub = {k: v[idx.to(v.device)] for k, v in inputs.items()}
    frozen = routing.frozen
    modes = [(m, m.training) for m in frozen.modules()]
    try:
        frozen.eval()
        routing.computing = True
        with torch.no_grad():
            out = frozen(next(iter(sub.values()))) if routing.layout.feed is None else frozen(**sub)
    finally:
        routing.computing = False
        for m, mode in modes:
            m.training = mode
    ragged: dict[str, bool] = {}
    rows = output_rows(out, [routing.rs.field], len(miss), ragged)[routing.rs.field]
    # Token-level states are stored per token (ragged) even from a batch without a mask: widths vary.
    return rows, ragged[routing.rs.field] or (routing.layout.masked and rows[0].ndim >= 2)


def _layout(got: Any, mask: torch.Tensor | None, first: torch.Tensor, device: torch.device,
            dtype: torch.dtype | None, where: str) -> torch.Tensor:
    """Stored rows (a padded batch or a tensor) placed where the batch's mask has its real tokens.  Copies."""
    if isinstance(got, torch.Tensor):
        out = got
    else:
        values, have = got[0], got[1]
        n, width = int(first.shape[0]), int(first.shape[1]) if first.ndim >= 2 else int(values.shape[1])
        want = mask.to("cpu").bool() if isinstance(mask, torch.Tensor) else \
            torch.ones((n, width), dtype=torch.bool)
        have = have.to("cpu").bool()
        if not torch.equal(want.sum(1), have.sum(1)):
            raise HeadInputError(
                f"recycle: the rows served from {where} have {have.sum(1).tolist()} tokens, but the batch's "
                f"attention_mask marks {want.sum(1).tolist()}: a row does not match its sample; verify the store")
        out = values.new_zeros((n, want.shape[1], *values.shape[2:]))
        out[want] = values[have]
    return out.to(device=device, dtype=dtype if dtype is not None and out.is_floating_point() else out.dtype)
