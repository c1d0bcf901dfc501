"""One split mechanism for every block-structured model, driven by the model's own forward.

``Frozen`` runs ``base(**inputs)`` — the model's own forward, unchanged — with a
forward hook on the split point that records its output and aborts the
forward there (:class:`actstore.models.capture.LayerCapture`). It returns the
states as :class:`~actstore.models.states.SplitStates`, a tensor that also
carries the batch's ``attention_mask`` and ``position_ids``, so
``head(frozen(x))`` needs no plumbing.

``Head`` runs ``base(inputs_embeds=states, attention_mask=mask,
position_ids=...)`` (position ids where the upper blocks read them) — again the
model's own forward — inside :func:`stand_ins`, which for that one call
replaces the ``forward`` of the stem modules and of blocks ``0..k`` by
stand-ins that return the cached states (in the block's output structure).
Everything else is the model's code: it builds the causal or padding mask from
``attention_mask`` in its own format (eager, SDPA), computes rotary or
relative position embeddings, runs blocks ``k+1..`` and the final norm or
pooler, and returns its own output type. Nothing of transformers' internals
is copied, so a new release that changes how masks are built changes both
parts alike. The stand-ins cost nothing: the head's time is the time of the
blocks it runs (see ``benchmarks/bench_split.py``).

The stand-ins check that the stream reaching the next block is the states
they returned: a model whose forward adds a block's output to the stream
(``x = x + block(x)``, blocks returning the branch) is refused rather than
split wrongly; the frozen part checks the same between the blocks it runs.

Not thread-safe: the stand-ins patch the shared modules for the duration of a
head call, so do not run the full model in another thread meanwhile.
``torch.compile`` of the head is not supported.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from actstore.errors import SplitError
from actstore.models.capture import LayerCapture, StopForward, model_arguments, reduce_output
from actstore.models.layout import BlockLayout, get_module
from actstore.models.states import HeadCall, SplitStates, head_call, head_inputs

__all__ = ["Frozen", "Head", "HeadCall", "SplitError", "SplitStates", "head_call", "head_inputs", "input_grad", "stand_ins"]


_CACHE_ARGS = ("past_key_values", "cache")


def _identical(a: Any, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def _branch_error(model: nn.Module, blocks: str, j: int) -> SplitError:
    return SplitError(
        f"{type(model).__name__}: the stream entering block {blocks}.{j} is not what block {blocks}.{j - 1} returned "
        "(its forward adds the block's output to the stream, or changes it between blocks). A hook on a block "
        "would see the branch, not the residual stream, so split refuses to cut there. Make the blocks return "
        "the stream (x + branch), or write the frozen and head modules yourself."
    )


@contextlib.contextmanager
def _patched(modules: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    saved = []
    try:
        for module, forward in modules:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward  # an instance attribute shadows the class's forward for this call
        yield
    finally:
        for module, old in reversed(saved):
            if old is None:
                del module.forward
            else:
                module.forward = old


@contextlib.contextmanager
def stand_ins(base: nn.Module, layout: BlockLayout, k: int, states: torch.Tensor) -> Iterator[None]:
    """Replace the stem and blocks ``0..k`` of ``base`` by stand-ins returning ``states``, for one call.

    Raises :class:`SplitError` (from inside the call) when the stream entering a
    block after the first stand-in is not the states the previous one returned.
    The layout's ``shared`` modules (frozen-part modules the call reads) see
    detached aliases of their parameters during the call, so the head's
    backward never reaches them; their ``requires_grad`` is never changed, so a
    checkpointed block recomputed after the call sees the same tensors
    (transformers' non-reentrant checkpointing compares them), and the frozen
    part is left exactly as it was, also when the call raises.
    """
    ctx: dict[str, Any] = {}
    blocks = layout.block_list(base)

    def stem(*args: Any, **kwargs: Any) -> Any:
        return states

    def block(j: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if j > 0:
                first = args[0] if args else next(iter(kwargs.values()), None)
                if not _identical(first, states):
                    raise _branch_error(base, layout.blocks, j)
            return layout.extras(base, states, ctx)

        return forward

    patches: list[tuple[nn.Module, Any]] = [(get_module(base, name), stem) for name in layout.stubs]
    patches += [(blocks[j], block(j)) for j in range(k + 1)]
    handle = None
    if 0 <= k + 1 < len(blocks):
        def check(module: nn.Module, args: Any, kwargs: Any) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not _identical(first, states):
                raise _branch_error(base, layout.blocks, k + 1)

        handle = blocks[k + 1].register_forward_pre_hook(check, with_kwargs=True)
    try:
        with _patched(patches), _detached([get_module(base, name) for name in layout.shared]):
            yield
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def _detached(modules: list[nn.Module]) -> Iterator[None]:
    """For one call, the parameters of ``modules`` read as detached aliases (same storage, no gradient).

    Frozen modules the head's call reads (rotary, relative embeddings) take no
    gradient from the head, without their ``requires_grad`` being toggled (a
    toggle would differ between the forward and a checkpoint's recompute, and
    is global state other code sees).
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for name, param in list(owner._parameters.items()):
                    if param is not None and param.requires_grad:
                        saved.append((owner, name, param))
                        owner._parameters[name] = param.detach()  # type: ignore[assignment]
        yield
    finally:
        for owner, name, param in reversed(saved):
            owner._parameters[name] = param


def input_grad(base: nn.Module, layout: BlockLayout, k: int, states: torch.Tensor,
               outer: nn.Module | None = None) -> torch.Tensor:
    """``states``, or a detached alias of them that requires grad where the head's call needs one.

    Reentrant activation checkpointing (``use_reentrant=True``, torch's default
    when it is not given) computes no gradient for a checkpointed block whose
    inputs do not require grad: the first block after the cut would get none,
    silently. transformers makes the input embeddings' output require grad for
    it (``enable_input_require_grads``), but the head's stem is a stand-in, so
    the states themselves must. Done when grad is on and a block after the cut
    is checkpointed reentrantly in training mode, or when the model asked for
    input gradients (``enable_input_require_grads``). Never copies.
    """
    if states.requires_grad or not torch.is_grad_enabled() or not states.is_floating_point():
        return states
    hooked = any(getattr(m, "_require_grads_hooks", None) for m in (base, outer) if m is not None)
    if hooked or any(_reentrant(block) for block in list(layout.block_list(base))[k + 1:]):
        return states.detach().requires_grad_()
    return states


def _reentrant(block: nn.Module) -> bool:
    """Whether ``block`` runs under transformers' reentrant activation checkpointing now."""
    if not (getattr(block, "gradient_checkpointing", False) is True and block.training):
        return False
    func = getattr(block, "_gradient_checkpointing_func", None)
    keywords = func.keywords if isinstance(func, functools.partial) else {}
    return keywords.get("use_reentrant", True) is not False  # torch's checkpoint defaults to reentrant


def _accepted(forward: Any) -> set[str] | None:
    """Keyword names ``forward`` accepts (``None``: any, it takes ``**kwargs``)."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class _Part(nn.Module):
    """A part of a split model: its own modules registered, the whole model reachable through attributes.

    The model (``base``) lives in the instance ``__dict__``, not in the module
    tree: the part's ``parameters()``, ``state_dict()``, ``to()`` and
    ``train()`` cover its own modules only, never the other part's. Any other
    attribute the part does not have is read from the model, as peft's
    ``PeftModel`` does (``part.device``, ``part.dtype``, ``part.main_input_name``,
    ``part.config``), so a trainer sees the model it expects; setting one sets
    it on the part. The head of a task model reads them from the task model
    (``outer``: ``head.save_pretrained`` saves the whole task model). Dunder
    names are not passed through (``copy``, ``pickle`` and friends probe them
    on the part itself).
    """

    def __init__(self, base: nn.Module, layout: BlockLayout, k: int, at: str) -> None:
        super().__init__()
        self.at = at
        self.layout = layout
        self.k = k
        self.__dict__["base"] = base  # not registered: its modules on the other side of the cut are not this part's
        self.training = base.training  # the model's mode, as its modules have it

    def _model(self) -> nn.Module:
        """The model attributes are read from: the task model around the base (``outer``), else the base."""
        d = self.__dict__
        outer = d.get("outer")
        return d["base"] if outer is None else outer  # type: ignore[no-any-return]

    @property
    def config(self) -> Any:
        """The model's ``config`` (``None`` when it has none)."""
        return getattr(self._model(), "config", None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The model's activation checkpointing flag, read without transformers' deprecation warning (peft asks)."""
        base = self._model()
        if isinstance(getattr(type(base), "is_activation_checkpointing", None), property):
            return bool(base.is_activation_checkpointing)
        return bool(getattr(base, "is_gradient_checkpointing", False))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # the part's own parameters, buffers and modules
        except AttributeError:
            base = self.__dict__.get("outer")
            base = self.__dict__.get("base") if base is None else base
            if base is None or (name.startswith("__") and name.endswith("__")):
                raise
            return getattr(base, name)


class Frozen(_Part):
    """The model up to and including the split point: stem, blocks ``0..k`` and the modules they use (shared).

    ``forward`` takes what the model takes — keyword tensors, a tokenizer's
    ``BatchEncoding`` / a features dict (keys the model does not take are
    ignored), or a tensor — runs the model's own forward and stops after the
    split point. Returns :class:`~actstore.models.states.SplitStates` (the
    states plus the batch's ``attention_mask`` and ``position_ids``, for the
    head). A key/value cache (``past_key_values``, ``cache``) is refused: the
    head runs without one (:class:`SplitError`). Attributes it does not have are read from the model
    (see ``_Part``); ``parameters()`` and ``state_dict()`` are the frozen part's.

    Attributes
    ----------
    at : str
        The split point (a module name of the model that was split).
    layer : torch.nn.ModuleDict
        The frozen blocks, keyed by their index.
    """

    def __init__(self, base: nn.Module, layout: BlockLayout, k: int, at: str, point: str,
                 owned: dict[str, nn.Module], root: nn.Module | None = None) -> None:
        super().__init__(base, layout, k, at)
        blocks = layout.block_list(base)
        self.layer = nn.ModuleDict({str(i): blocks[i] for i in range(k + 1)})
        self.parts = nn.ModuleDict({name.replace(".", "__"): m for name, m in owned.items()})
        self.__dict__["root"] = base if root is None else root  # the model that was split (older stores' fingerprint)
        self._point = point
        self._accepted = _accepted(base.forward)

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        base = self.__dict__["base"]
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = model_arguments(base, args[0])
        if self._accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepted}
        if self.layout.use_cache:
            kwargs.setdefault("use_cache", False)
        return args, kwargs

    def forward(self, *args: Any, **kwargs: Any) -> SplitStates:
        base = self.__dict__["base"]
        args, kwargs = self._arguments(args, kwargs)
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        cached = [k for k in _CACHE_ARGS if kwargs.get(k) is not None]
        if cached:
            raise SplitError(
                f"the frozen part got {cached[0]}=: the split parts run whole sequences without a key/value cache "
                "(the head could not attend to the cached tokens). Call it without a cache."
            )
        blocks = self.layout.blocks
        # Custom models: also watch the next block's input: the stream must be what the split point returned.
        n = len(self.layout.block_list(base))
        nxt = f"{blocks}.{self.k + 1}" if self.k + 1 < n else None
        states = _run_checked(base, self._point, nxt, args, kwargs, self.layout)
        return SplitStates(states, mask if isinstance(mask, torch.Tensor) else None,
                           positions if isinstance(positions, torch.Tensor) else None)


def _run_checked(base: nn.Module, point: str, nxt: str | None, args: Any, kwargs: Any,
                 layout: BlockLayout) -> torch.Tensor:
    if nxt is None or not layout.checked:
        return LayerCapture(base, point, clone=False).run(*args, **kwargs)[point]
    out: dict[str, torch.Tensor] = {}
    modules = dict(base.named_modules())

    def stop(module: nn.Module, a: Any, kw: Any) -> None:
        first = a[0] if a else next(iter(kw.values()), None)
        if "states" not in out or not _identical(first, out["states"]):
            raise _branch_error(base, layout.blocks, int(nxt.rsplit(".", 1)[1]))
        raise StopForward  # ends the forward at the next block

    def record(module: nn.Module, a: Any, output: Any) -> None:
        out.setdefault("states", reduce_output(output, point))

    handles = [modules[point].register_forward_hook(record), modules[nxt].register_forward_pre_hook(stop, with_kwargs=True)]
    try:
        base(*args, **kwargs)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "states" not in out:
        raise RuntimeError(f"{point!r} did not run in {type(base).__name__}'s forward")
    return out["states"]


class Head(_Part):
    """The model after the split point: blocks ``k+1..`` and the tail (final norm, pooler), shared.

    ``forward`` takes the cached states in any form
    :func:`~actstore.models.states.head_call` accepts (``head(states,
    mask)``, ``head(split_states)``, a ``PaddedBatch``, a dict; optionally
    ``position_ids=``) and returns the model's own output (for a Hugging Face model its
    ``ModelOutput``, e.g. ``last_hidden_state`` and ``pooler_output``), equal
    to the full model's on the same batch. A plain tensor without a mask is
    refused for a model that reads one (:class:`~actstore.errors.HeadInputError`)
    unless ``padding=False`` says every token is real. States of another floating dtype
    (a float16 store) are cast to the head's parameter dtype. Attributes it
    does not have are read from the model (see ``_Part``); ``parameters()``
    and ``state_dict()`` are the head's: what to train.

    The call also reads modules of the frozen part (the layout's ``shared``
    ones: rotary or relative position embeddings), which it never trains:
    keep the model on one device (``model.to(device)``), not just the head.

    Attributes
    ----------
    at : str
        The split point.
    layer : torch.nn.ModuleDict
        The head's blocks, keyed by their index.
    tail : torch.nn.ModuleDict
        The modules after the blocks (names with ``__`` for ``.``).
    """

    def __init__(self, base: nn.Module, layout: BlockLayout, k: int, at: str, tail: dict[str, nn.Module]) -> None:
        super().__init__(base, layout, k, at)
        blocks = layout.block_list(base)
        self.layer = nn.ModuleDict({str(i): blocks[i] for i in range(k + 1, len(blocks))})
        self.tail = nn.ModuleDict({name.replace(".", "__"): m for name, m in tail.items()})

    def _cast(self, states: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters(), None)
        if param is not None and states.is_floating_point() and states.dtype != param.dtype:
            return states.to(param.dtype)
        return states

    def inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HeadCall:
        """The head's arguments checked (:func:`~actstore.models.states.head_call`: a masked model refuses a
        plain tensor without its mask unless ``padding=False``)."""
        return head_call(args, kwargs, masked=self.layout.masked)

    def run(self, states: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> Any:
        """The model's forward on ``states`` after the split point (the generic mechanism).

        ``position_ids`` are passed on where the upper blocks read them (the
        layout's ``positions``: rotary embeddings, packed-sequence masks), as
        the full model got them; where only the stem reads them their effect
        is in the states already.
        """
        base = self.__dict__["base"]
        states = input_grad(base, self.layout, self.k, self._cast(states))
        kwargs = self.arguments(states, mask, position_ids)
        with stand_ins(base, self.layout, self.k, states):
            if self.layout.feed is None:  # a custom forward: the states stand in for its input
                return base(states, **kwargs)
            return base(**kwargs)

    def arguments(self, states: torch.Tensor, mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """The keyword arguments of the model's forward for the head's call on ``states`` (never copies)."""
        kwargs: dict[str, Any] = {}
        if self.layout.feed == "inputs_embeds":
            kwargs["inputs_embeds"] = states
        elif self.layout.feed == "pixel_values":
            kwargs["pixel_values"] = states.new_zeros((states.shape[0], 1, 1, 1))
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device=states.device, dtype=torch.long)
        if position_ids is not None and self.layout.positions:
            kwargs["position_ids"] = position_ids.to(device=states.device)
        if self.layout.use_cache:
            kwargs["use_cache"] = False
        return kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self.inputs(args, kwargs)
        return self.run(call.states, call.attention_mask, call.position_ids)
