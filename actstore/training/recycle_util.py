"""What :func:`actstore.recycle` adds to a model: :class:`RecycledModel`, the routing state, the checks around it."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from actstore.errors import HeadInputError, SplitError
from actstore.format.dtypes import dtype_name
from actstore.format.fields import Field
from actstore.models.blocks import Frozen
from actstore.models.fingerprint import WeightsWatch, frozen_fingerprint
from actstore.models.layout import BlockLayout
from actstore.training.recycle_store import RecycleStore

__all__ = ["RecycledModel", "Routing", "features_hook", "freeze", "labels_hook", "tied_across", "untie"]

#: The hit rate below which a store that should serve hits warns (inputs that never repeat).
LOW_HIT_RATE = 0.05
#: The fewest lookups after the first pass that the hit-rate warning judges (a second pass: at least as many as the first).
MIN_WINDOW = 32


class Routing:
    """The state of one recycled model: its base, the frozen part, the store, the statistics.

    Held in the model's ``__dict__`` (not a submodule: ``state_dict`` and
    ``parameters()`` are the model's own).
    """

    def __init__(self, model: nn.Module, base: nn.Module, layout: BlockLayout, frozen: Frozen, rs: RecycleStore,
                 hit_rate_after: int | None, route: Callable[[Routing, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        self.base, self.layout, self.frozen, self.rs, self.route = base, layout, frozen, rs, route
        self.kind = type(model).__name__
        self.outer = weakref.ref(model)  #: the recycled model (weak: the finalizer must not keep it alive)
        self.hits = self.misses = self.lookups = 0
        self.after = hit_rate_after if hit_rate_after is not None else rs.rows_at_open
        self.later_hits = self.later = 0
        self.warned = False
        #: the frozen part's weights as they were when their fingerprint last matched the store's
        self.watch = WeightsWatch()
        self.computing = False  #: the frozen part is computing misses through the base's original forward
        self.grads: list[tuple[nn.Parameter, bool]] = []
        self.hook: Any = None
        self.features_hook: Any = None
        #: a SentenceTransformer's features dict of the current call (tensors and scalar constants), for the keys
        self.features: dict[str, Any] | None = None
        self.finalizer: Any = None
        self.saved: Any = None
        self.original: Any = None
        self.routed: Any = None  #: the routed forward set on the base
        self.closed = False  #: unrecycled: the routed forward, if still reachable through a wrapper, passes through
        self.signature: Any = None
        self.release: Callable[[Any], Any] = lambda model: None  #: actstore.unrecycle (set by recycle)

    @property
    def store(self) -> RecycleStore:
        return self.rs

    def check_fresh(self) -> None:
        """At every forward: the frozen weights are still those the store was checked against.

        The fingerprint (a hash of every frozen weight) is computed at the first forward, and again whenever a
        frozen tensor was replaced or modified in place since (a checkpoint or an EMA loaded into the frozen part
        between two forwards; :class:`~actstore.models.fingerprint.WeightsWatch`)."""
        if not self.watch.unchanged(self.frozen):
            self.rs.check_fresh(frozen_fingerprint(self.frozen), self.frozen)
            self.watch.verified(self.frozen)

    def count(self, n: int, computed: int) -> None:
        """Record a batch's lookups; warn once when, after the first pass, the inputs almost never repeat."""
        self.lookups += n
        self.misses += computed
        self.hits += n - computed
        if self.after <= 0 or self.lookups <= self.after:
            return
        new = min(n, self.lookups - self.after)
        self.later += new
        self.later_hits += max(new - computed, 0)
        if not self.warned and self.later >= max(self.after, MIN_WINDOW) and self.later_hits < LOW_HIT_RATE * self.later:
            self.warned = True
            warnings.warn(
                f"recycle: {self.later_hits} of the last {self.later} samples were found in {self.rs.path} after "
                f"the first {self.after} lookups: the model's inputs almost never repeat (random augmentation before "
                "the model?). Recycling then only adds work and grows the store; apply augmentation after the "
                "frozen part, keep a fixed set of augmented views (augmentations: issue 'several stored "
                "augmentations per sample'), cap the store with max_rows=, or train without recycle",
                RuntimeWarning, stacklevel=5)

    def field_of(self, extra: dict[int, torch.Tensor]) -> Field:
        """The field of rows all computed or appended in memory (nothing of the batch is committed yet)."""
        stored = self.rs.stored_field
        if stored is not None:
            return stored
        sample = next(iter(extra.values()))
        ragged = self.layout.masked and sample.ndim >= 2
        shape = (None, *sample.shape[1:]) if ragged else tuple(sample.shape)
        return Field(tuple(shape), dtype_name(sample.dtype))


class RecycledModel:
    """Methods :func:`actstore.recycle` adds to the model's class (the subclass keeps the class's own name).

    ``model.close()`` and leaving a ``with model:`` block commit the store,
    release its writer lock and give the model its plain class back
    (:func:`actstore.unrecycle`).
    """

    def _actstore_routing(self) -> Routing:
        return self.__dict__["_actstore_recycle"]  # type: ignore[no-any-return]

    @property
    def hit_rate(self) -> float:
        """Samples served from the store (or from rows appended earlier) / samples looked up; 0.0 before any."""
        r = self._actstore_routing()
        return r.hits / r.lookups if r.lookups else 0.0

    @property
    def recycle_stats(self) -> dict[str, int]:
        """``{"lookups", "hits", "misses" (samples the frozen part computed), "appended" (rows stored)}``."""
        r = self._actstore_routing()
        return {"lookups": r.lookups, "hits": r.hits, "misses": r.misses, "appended": r.rs.appended}

    @property
    def recycle_store(self) -> Any:
        """The open :class:`~actstore.ActivationStore` (None until a store created here receives rows)."""
        return self._actstore_routing().rs.store

    def commit(self) -> int | None:
        """Commit the rows appended so far; returns the store's generation (None when nothing was written)."""
        return self._actstore_routing().rs.commit()

    def close(self) -> None:
        """Commit, release the store and give the model its plain class back (:func:`actstore.unrecycle`)."""
        routing = self.__dict__.get("_actstore_recycle")
        if routing is not None:
            routing.release(self)

    def __enter__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise SplitError(
            f"deep-copying a recycled {type(self).__name__} is not supported: the copy's forward would still route "
            "through the original's store and frozen part, and compute with the original's weights (an EMA or "
            "'best model' copy would be evaluated wrong). Copy the plain model (actstore.unrecycle(model), copy, "
            "recycle again), or keep copies of the trainable parameters' state_dict only")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise SplitError(
            f"pickling or copying a recycled {type(self).__name__} is not supported (its class is made at run time "
            "and it holds an open store): save model.state_dict(), or call actstore.unrecycle(model) first")

    def __exit__(self, *exc: object) -> None:
        self.close()


def freeze(routing: Routing) -> None:
    """Stop the frozen part's parameters requiring grad (remembering their flags for ``unrecycle``)."""
    for p in routing.frozen.parameters():
        routing.grads.append((p, p.requires_grad))
        p.requires_grad_(False)


def tied_across(model: nn.Module, frozen: Frozen, untie_weights: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The frozen part's weights used by a module after the cut (GPT-2's LM head): refused unless ``untie_weights``.

    Returns ``(module, name, parameter)`` per such use, for :func:`untie`.  Raises :class:`SplitError`.
    """
    frozen_params = {id(p): n for n, p in frozen.named_parameters()}
    frozen_modules = {id(m) for m in frozen.modules()}
    tied = [(name, module, pname, p) for name, module in model.named_modules(remove_duplicate=False)
            if id(module) not in frozen_modules
            for pname, p in module.named_parameters(recurse=False) if id(p) in frozen_params]
    if tied and not untie_weights:
        which = ", ".join(f"{n}.{pn} = frozen {frozen_params[id(p)]}" for n, _, pn, p in tied[:4])
        raise SplitError(
            f"recycle: weights are shared across the cut ({which}): training the model would change the frozen "
            "part and make the stored rows stale. Pass untie_weights=True to give the module after the cut its own "
            "copy (the model is untied: saved with tie_word_embeddings=False), or freeze that module")
    return [(module, pname, p) for _, module, pname, p in tied]


def untie(model: nn.Module, tied: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Give each module of ``tied`` its own copy of the shared weight; the config then says the model is untied."""
    if not tied:
        return
    for module, pname, p in tied:
        setattr(module, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda **_: None)()):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


_CONSTANTS = (type(None), bool, int, float, str)


def features_hook(routing: Routing) -> Callable[..., None]:
    """A forward pre-hook on a SentenceTransformer keeping the features dict it gets (the collate output precompute
    keys: tensors and batch-level constants such as ``modality``) for the routed encoder's keys."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        features = args[0] if args else kwargs.get("input")
        routing.features = None
        if isinstance(features, Mapping):  # a dict, a tokenizer's BatchEncoding
            routing.features = {k: v for k, v in features.items()
                                if isinstance(v, (torch.Tensor, *_CONSTANTS))}

    return hook


def labels_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse token-level ``labels`` that count padded positions (their outputs are not the original model's)."""
    labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return
    spans = [k for k in ("start_positions", "end_positions") if isinstance(kwargs.get(k), torch.Tensor)]
    if spans and bool((mask == 0).any()):
        raise HeadInputError(
            f"recycle: {spans[0]}= with a padded batch: a question-answering loss takes its softmax over every "
            "position, padded ones included, and a recycled model's outputs at padded positions are not the "
            "original model's, so the loss would differ. Feed batches without padding (every sample of a batch "
            "the same length: pad with real tokens, or padding='max_length' with truncation to one length and an "
            "all-ones attention_mask), or compute the loss yourself from the logits at real positions")
    if not isinstance(labels, torch.Tensor):
        return
    if labels.shape != mask.shape:
        return  # one label per sample (sequence classification, regression)
    bad = (labels != -100) & (mask == 0)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise HeadInputError(
            f"recycle: labels of {int(bad.sum())} padded positions (first in row {row}) are not -100: a recycled "
            "model's outputs at padded positions are not the original model's, so the loss would differ. Mask "
            "padding labels with -100 (DataCollatorForLanguageModeling and DataCollatorForTokenClassification do)")
