"""The head of a Hugging Face task model: the task model's own forward after the cut, loss included.

``split(BertForSequenceClassification, at)`` cuts the task model through its
base model (``model.bert``, named by ``base_model_prefix``): the frozen part
is the base model's (the same states, module names and fingerprint as
``split(model.bert, ...)``, so one store serves both), and the head is a
:class:`TaskHead`, which runs the **task model's** forward — base model,
classifier or LM head, loss — with the base model's stem and lower blocks
standing in for the cached states (:func:`~actstore.models.blocks.stand_ins`).
``head(states, labels=...)`` therefore returns the task model's own output
type with its own loss.

Task models are accepted by the name of their class (:data:`TASK_SUFFIXES`):
the kinds whose forward runs the base model on the inputs and then only
reads its output. Others (multiple choice reshapes the inputs, masked image
modelling masks the stem) are refused with :class:`~actstore.errors.SplitError`.

What the head refuses, so that its output and loss are the unsplit model's:

* inputs the stored states replace (``input_ids``, ``inputs_embeds``,
  ``pixel_values``, ``token_type_ids``, a key/value cache, ``head_mask``) and
  ``output_hidden_states`` / ``output_attentions`` (the lower layers' entries
  would be the stand-ins');
* token-level labels (token classification, causal LM) other than ``-100`` at
  padded positions or of another width than the states (labels padded to a
  tokenizer's ``max_length`` are cut to the states' width where the columns
  cut off are all ``-100``: the loss ignores them either way), and question-answering
  ``start_positions`` / ``end_positions`` on padding: the states there are the
  collate's padding, not what the unsplit model computed from pad tokens.
  Mask padding labels with ``-100``, as ``DataCollatorForLanguageModeling`` does.

A causal model's sequence classifier (``GPT2ForSequenceClassification``,
``LlamaForSequenceClassification``) picks each row's last token whose id is not
``config.pad_token_id``; the head has no token ids, so it gives the task model
ids made from the mask (the pad id on padding) and stands in for the input
embedding too. That equals the unsplit model's choice unless a real token has
the pad id, so a pad id that is also the ``eos``/``bos`` id is refused at split time.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from actstore.engine.read.ragged import PaddedBatch
from actstore.errors import HeadInputError
from actstore.models.blocks import Head, input_grad, stand_ins
from actstore.models.layout import BlockLayout

__all__ = ["TASK_SUFFIXES", "TaskHead", "task_base", "task_refusal", "task_head_class"]

TASK_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForCausalLM",
                 "LMHeadModel", "ForImageClassification")
"""Class-name endings of the task models ``split`` accepts (``GPT2LMHeadModel`` is GPT-2's causal LM)."""

# What the stored states replace: the head refuses them rather than run the stem on them or beside them.
_REPLACED = ("input_ids", "inputs_embeds", "pixel_values", "token_type_ids", "past_key_values", "cache", "head_mask")
_LAYER_OUTPUTS = ("output_hidden_states", "output_attentions")
_TOKEN_TASKS = ("ForTokenClassification", "ForCausalLM", "LMHeadModel")  # a label per token
_HEAD_KEYS = ("hidden_states", "attention_mask", "position_ids", "padding")
_BATCH_KEYS = frozenset({"hidden_states", "states", "values", "activations", "attention_mask", "mask", "position_ids"})


def task_base(model: Any) -> tuple[str, nn.Module] | None:
    """``(prefix, base)`` of a model that wraps a base model under ``base_model_prefix``, else ``None``."""
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(model, nn.Module) or not isinstance(prefix, str) or not prefix:
        return None
    base = model._modules.get(prefix)
    return (prefix, base) if isinstance(base, nn.Module) and base is not model else None


def _ids(config: Any, *names: str) -> set[int]:
    out: set[int] = set()
    for name in names:
        v = getattr(config, name, None)
        out.update(v if isinstance(v, (list, tuple)) else [v] if isinstance(v, int) else [])
    return out


def task_refusal(model: nn.Module, layout: BlockLayout) -> str | None:
    """Why the task model ``model`` (around a base model laid out as ``layout``) cannot be split, else ``None``."""
    name = type(model).__name__
    if not name.endswith(TASK_SUFFIXES):
        kinds = ", ".join(f"*{s}" for s in TASK_SUFFIXES)
        return (f"its task head ({name}) is not one split runs ({kinds}); split its base model and apply the "
                "task head yourself")
    if layout.causal and name.endswith("ForSequenceClassification"):
        config = getattr(model, "config", None)
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and pad in _ids(config, "eos_token_id", "bos_token_id"):
            return (f"{name} pools each row's last token whose id is not pad_token_id={pad}, which is also its "
                    "eos/bos id: a row ending in that token is pooled elsewhere than the head (which has no token "
                    "ids, only the mask) can tell. Give the model a dedicated pad token (config.pad_token_id)")
    return None


def _main_input(outer: type[nn.Module]) -> str:
    main = getattr(outer, "main_input_name", "input_ids")
    return main if isinstance(main, str) and main else "input_ids"


def _states_under(value: Any, batch: Mapping[str, Any]) -> bool:
    """Whether ``value`` under the model's main input key is stored states (``CachedDataset`` keeps the item's key):
    a floating ``(batch, tokens, hidden)`` tensor, which token ids (integers) and images (4-d) never are."""
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 3
            and not any(k in batch for k in ("hidden_states", "states", "values", "activations")))


def _signature(outer: type[nn.Module]) -> inspect.Signature:
    """The head's forward signature for a task model class: the states' arguments, then the task model's others."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("hidden_states", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
              inspect.Parameter("attention_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
              inspect.Parameter(_main_input(outer), inspect.Parameter.KEYWORD_ONLY, default=None),
              inspect.Parameter("position_ids", inspect.Parameter.KEYWORD_ONLY, default=None),
              inspect.Parameter("padding", inspect.Parameter.KEYWORD_ONLY, default=None)]
    var: list[inspect.Parameter] = []
    try:
        theirs = list(inspect.signature(outer.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        theirs = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    for p in theirs:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var = [p]
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL and p.name not in (*_HEAD_KEYS, *_REPLACED):
            default = None if p.default is inspect.Parameter.empty else p.default
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=default))
    return inspect.Signature([*params, *var])


class TaskHead(Head):
    """The head of a Hugging Face task model: blocks ``k+1..``, the tail and the task modules.

    ``forward`` takes the cached states in any form :class:`Head` takes, plus
    any keyword the task model's ``forward`` takes (``labels``,
    ``start_positions``, ``return_dict``, ``num_items_in_batch``, ...), also as
    keys of a dict batch (``head({"hidden_states", "attention_mask",
    "labels"})``, what ``CachedDataset`` with ``ActivationCollate(names={})``
    gives), and returns the task model's own output (``SequenceClassifierOutput``,
    ``CausalLMOutputWithPast``, ...) with its loss when labels are given, equal
    to the unsplit task model's at the real tokens. The states may also come
    under the model's main input name (``input_ids``, ``pixel_values``) when
    they are a floating ``(batch, tokens, hidden)`` tensor, as ``CachedDataset``
    names them by default (the item's own key); real token ids or images are refused. Refusals: see
    :mod:`actstore.models.task`. Never copies the states (a dtype cast does).

    The class is made once per task model class (:func:`task_head_class`) so
    that its ``forward`` signature lists the task model's arguments: trainers
    inspect it (``transformers.Trainer`` keeps the dataset columns it names,
    finds the label names in it, passes ``num_items_in_batch`` when it takes
    ``**kwargs``). ``_get_name()`` is the task model's (Trainer's label
    smoothing shifts the labels of causal LMs by that name). Attributes are
    read from the task model (``head.save_pretrained`` saves the whole model,
    trained weights included). ``parameters()``: blocks ``k+1..``, the tail and
    the task modules (classifier, LM head) — what to train.

    Attributes
    ----------
    task : torch.nn.ModuleDict
        The task model's modules outside its base model (classifier, dropout, LM head).
    """

    def __init__(self, outer: nn.Module, base: nn.Module, layout: BlockLayout, k: int, at: str,
                 tail: dict[str, nn.Module], task: dict[str, nn.Module]) -> None:
        super().__init__(base, layout, k, at, tail)
        self.__dict__["outer"] = outer  # not registered, as the base: read through, never part of this module tree
        self.training = outer.training
        self.task = nn.ModuleDict({name.replace(".", "__"): m for name, m in task.items()})
        self._pools_by_ids = layout.causal and type(outer).__name__.endswith("ForSequenceClassification")
        self._token_labels = type(outer).__name__.endswith(_TOKEN_TASKS)
        sig = inspect.signature(type(self).forward)
        self._takes = {p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        self._any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())

    def _get_name(self) -> str:
        return self.__dict__["outer"]._get_name()  # type: ignore[no-any-return]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        main = _main_input(type(self.__dict__["outer"]))
        if _states_under(kwargs.get(main), kwargs):
            kwargs["hidden_states"] = kwargs.pop(main)
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in _HEAD_KEYS}
        if args and isinstance(args[0], Mapping) and not isinstance(args[0], PaddedBatch):
            batch = dict(args[0])
            if _states_under(batch.get(main), batch):
                batch["hidden_states"] = batch.pop(main)
            for key in [k for k in batch if k not in _BATCH_KEYS]:
                if key in extra:
                    raise TypeError(f"the head got {key!r} both in its batch dict and as a keyword; pass it once")
                extra[key] = batch.pop(key)
            args = (batch, *args[1:])
        self._refuse(extra)
        call = self.inputs(args, kwargs)
        self._check_labels(extra, call.attention_mask, call.states.shape[1])
        return self.run(call.states, call.attention_mask, call.position_ids, **extra)

    def _refuse(self, extra: dict[str, Any]) -> None:
        outer = type(self.__dict__["outer"]).__name__
        for key, value in extra.items():
            if key in _REPLACED:
                raise HeadInputError(
                    f"the head of {outer} got {key}=: the stored states take the place of the model's inputs "
                    f"({', '.join(_REPLACED[:4])}) and of a key/value cache. Drop {key!r} from the batch.")
            if key in _LAYER_OUTPUTS and value:
                raise HeadInputError(
                    f"the head of {outer} got {key}=True: the layers up to the cut are stand-ins for the stored "
                    "states, so their entries would not be the model's. Call the unsplit model for them.")
            if not self._any and key not in self._takes:
                raise TypeError(f"the head of {outer} got an unexpected argument {key!r}; it takes the states "
                                f"({', '.join(_HEAD_KEYS)}) and {sorted(self._takes - set(_HEAD_KEYS))}")

    def _check_labels(self, extra: dict[str, Any], mask: torch.Tensor | None, width: int) -> None:
        """Refuse labels the loss would read at padding (see the module docstring); token labels wider than the
        states whose extra columns are all -100 (padded to a tokenizer's max_length) are cut to the states' width
        (a contiguous copy, since the model's own loss calls ``labels.view(-1)``; the loss ignores those columns either
        way)."""
        outer = type(self.__dict__["outer"]).__name__
        real = None if mask is None else mask != 0
        for key in [k for k in extra if "label" in k] if self._token_labels else []:
            value = extra[key]
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.is_floating_point():
                continue
            if value.shape[1] > width and bool((value[:, width:] == -100).all()):
                value = extra[key] = value[:, :width].contiguous()
            if value.shape[1] != width:
                raise HeadInputError(
                    f"{key} of the head of {outer} span {value.shape[1]} tokens and the states {width}: token "
                    "labels must have the states' width (the store holds each row's real tokens, and the collate "
                    "pads them to the longest row). Pad the labels with -100 to the batch's longest row.")
            if real is not None and bool((value[~real.to(value.device)] != -100).any()):
                raise HeadInputError(
                    f"{key} of the head of {outer} hold labels other than -100 at padded positions: the loss "
                    "would read the outputs there, and the states at padding are not the unsplit model's (the "
                    "store holds each row's real tokens). Set the labels at padding to -100, as "
                    "DataCollatorForLanguageModeling does (labels[attention_mask == 0] = -100).")
        if real is None or bool(real.all()):
            return
        for key, value in extra.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in ("start_positions", "end_positions") and value.dim() == 1 and len(value) == len(real):
                pos = value.to(real.device).long()
                inside = (pos >= 0) & (pos < real.shape[1])
                rows = torch.nonzero(inside & ~real[torch.arange(len(pos), device=real.device),
                                                    pos.clamp(0, real.shape[1] - 1)]).flatten()
                if len(rows):
                    i = int(rows[0])
                    raise HeadInputError(
                        f"{key}[{i}] = {int(pos[i])} points at padding (row {i} has {int(real[i].sum())} real "
                        f"tokens): the logits there are not the unsplit model's. Point it at a real token, or "
                        f"past the row's width ({real.shape[1]}) to have the loss ignore it.")

    def run(self, states: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
            **extra: Any) -> Any:
        """The task model's forward on ``states`` after the split point, with ``extra`` keywords (never copies)."""
        base, outer = self.__dict__["base"], self.__dict__["outer"]
        states = input_grad(base, self.layout, self.k, self._cast(states), outer)
        kwargs = self.arguments(states, mask, position_ids)
        kwargs.update(extra)
        embedding = None
        if self._pools_by_ids:
            # The classifier pools the last token whose id is not the pad id: ids from the mask, the embedding a stand-in.
            kwargs["input_ids"] = self._mask_ids(kwargs.pop("inputs_embeds"), mask)
            embedding = base.get_input_embeddings()
        with stand_ins(base, self.layout, self.k, states), _returning(embedding, states):
            return outer(**kwargs)

    def _mask_ids(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        pad = getattr(self.config, "pad_token_id", None)
        real_id = 1 if pad == 0 else 0
        ids = torch.full(states.shape[:2], real_id, dtype=torch.long, device=states.device)
        if isinstance(pad, int) and mask is not None:
            ids[mask.to(states.device) == 0] = pad
        return ids


@contextlib.contextmanager
def _returning(module: nn.Module | None, states: torch.Tensor) -> Iterator[None]:
    """For one call, ``module`` (if any) returns ``states`` (an instance ``forward``, removed after)."""
    if module is None:
        yield
        return
    module.forward = lambda *args, **kwargs: states
    try:
        yield
    finally:
        del module.forward


_CLASSES: dict[type[nn.Module], type[TaskHead]] = {}


def task_head_class(outer: type[nn.Module]) -> type[TaskHead]:
    """The :class:`TaskHead` subclass for task model class ``outer``: its ``forward`` signature lists
    ``outer.forward``'s arguments (made once per class)."""
    cls = _CLASSES.get(outer)
    if cls is None:
        def forward(self: TaskHead, *args: Any, **kwargs: Any) -> Any:
            return TaskHead.forward(self, *args, **kwargs)

        forward.__signature__ = _signature(outer)  # type: ignore[attr-defined]
        forward.__doc__ = TaskHead.forward.__doc__
        cls = type(f"{outer.__name__}Head", (TaskHead,), {"forward": forward, "__module__": __name__,
                                                         "__doc__": TaskHead.__doc__})
        _CLASSES[outer] = cls
    return cls
