"""The DataLoader side of a precompute run: per-batch preparation in the workers, collation, device moves.

:class:`Prepare` (the DataLoader's ``collate_fn``) encodes each item
(:func:`~actstore.precompute.items.encode_item`), collates the inputs and
computes each sample's key in the workers — its input key
(:func:`~actstore.precompute.inputs.input_keys`: the collated batch split per
sample and trimmed), or ``key_fn`` of the raw input when one is given; the
result is a :class:`Group`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.precompute.augment import AugmentError, AugmentSpec, Expanded, augmented_keys
from actstore.precompute.inputs import batch_signature, input_keys
from actstore.precompute.items import Selector
from actstore.precompute.keys import check_key

__all__ = ["DEFAULT_COLLATE_NAMES", "Group", "IterableWrapper", "Prepare", "default_collate", "field_name", "pad_collate", "qualname", "to_device"]


@dataclass
class Group:
    """One DataLoader batch after :class:`Prepare`: keys, inputs, side values, maybe collated."""

    keys: np.ndarray  # (n, 32) uint8
    inputs: list[Any] | None  # raw model inputs; None when `collated` covers them (refetch if needed)
    sides: list[dict[str, Any] | None]
    structure: dict[str, Any] | None  # of the first item (Selector.structure), recorded in the store's attrs
    collated: Any = None
    error: tuple[int, BaseException] | None = None  # (offset in the batch, exception)
    collate_error: BaseException | None = None
    item_type: type | None = None  # the type of every item of the group
    signature: str | None = None  # the collated batch's structure (batch_signature), None when not collated
    batch_error: bool = False  # `error` concerns the whole batch (its collate or its split), not one item
    input_keys: np.ndarray | None = None  # with augment: the augmented inputs' own keys (`keys` are derived from them)

    def __len__(self) -> int:
        return len(self.sides)

    def pin_memory(self) -> Group:  # called by DataLoader(pin_memory=True)
        if self.collated is not None:
            from torch.utils.data._utils.pin_memory import pin_memory

            self.collated = pin_memory(self.collated)
        return self


class Prepare:
    """The DataLoader ``collate_fn``: split items, collate the inputs, key each sample.

    Runs in the DataLoader workers (or the main thread with ``num_workers=0``).
    With ``key_fn`` None a sample's key is its input key (the collated batch
    split per sample and trimmed, ``lengths_fn`` giving token counts where the
    batch has no ``attention_mask``); with ``key_fn`` it is ``key_fn`` of the raw
    input, and the collate is speculative (a failure is raised by the main
    thread if the batch is needed).  Errors are caught and returned in the
    :class:`Group` with the item's offset, so that the main thread can name the
    dataset index.

    With ``augment`` the items are :class:`~actstore.precompute.augment.Expanded`
    (item ``p``, augmentation ``v``): each input is replaced by its augmentation
    before the collate, and its key is derived from the item's content key,
    ``v`` and the augmented input's key (:mod:`actstore.precompute.augment`).
    """

    def __init__(self, selector: Selector, key_fn: Callable[[Any], bytes] | None, collate_fn: Callable[[list[Any]], Any],
                 keep_inputs: bool, lengths_fn: Callable[[Any], Any] | None = None,
                 augment: AugmentSpec | None = None) -> None:
        self.selector = selector
        self.key_fn = key_fn
        self.collate_fn = collate_fn
        self.keep_inputs = keep_inputs
        self.lengths_fn = lengths_fn
        self.augment = augment

    def __call__(self, items: Sequence[Any]) -> Group:
        expanded: list[Expanded] | None = None
        if self.augment is not None:
            expanded = list(items)
            items = [e.item for e in expanded]
        inputs: list[Any] = []
        sides: list[dict[str, Any] | None] = []
        buf = bytearray()
        first_type = type(items[0]) if len(items) else None
        for j, item in enumerate(items):
            try:
                if type(item) is not first_type:
                    raise TypeError(f"the item is a {type(item).__name__}, but the items before it are "
                                    f"{first_type.__name__ if first_type else '?'}: a dataset's items must all have "
                                    "one type")
                x, side = self.selector.split(item)
                if self.key_fn is not None:
                    buf += check_key(self.key_fn(x))
            except Exception as e:  # reported with its dataset index by the main thread
                return Group(np.empty((0, 32), np.uint8), None, [], None, error=(j, e))
            inputs.append(x)
            sides.append(side)
        keys = np.frombuffer(bytes(buf), np.uint8).reshape(-1, 32)
        content = None
        if expanded is not None and self.augment is not None:
            try:
                content, inputs = self.augment.apply(inputs, [e.position for e in expanded],
                                                     [e.augmentation for e in expanded], self.collate_fn, self.lengths_fn)
            except AugmentError as e:
                return Group(np.empty((0, 32), np.uint8), None, [], None, error=(e.offset, e))
            except Exception as e:  # the collate of the items themselves (for their content keys)
                j, err, whole = self._culprit(inputs, e)
                return _failed(Group(keys, inputs, sides, None), (j, err), whole)
        group = Group(keys, inputs, sides, self.selector.structure(items[0]) if len(items) else None,
                      item_type=first_type)
        try:
            group.collated = self.collate_fn(inputs)
        except Exception as e:
            if self.key_fn is not None:  # keys do not need the batch: the main thread collates again if it must
                group.collate_error = e
            else:
                j, err, whole = self._culprit(inputs, e)
                return _failed(group, (j, err), whole)
        if self.key_fn is None:
            try:
                group.keys = input_keys(group.collated, len(inputs), lengths_fn=self.lengths_fn, raw=inputs)
            except Exception as e:
                return _failed(group, (0, e), whole=True)
        if content is not None and expanded is not None:
            group.input_keys = group.keys
            group.keys = augmented_keys(content, [e.augmentation for e in expanded], group.keys)
        if group.collated is not None:
            group.signature = batch_signature(group.collated)
        if group.collated is not None and not self.keep_inputs:
            group.inputs = None
        return group

    def _culprit(self, inputs: list[Any], error: BaseException) -> tuple[int, BaseException, bool]:
        """(offset, error, whole batch?) of the first input that ``collate_fn`` refuses alone (a missing file, say),
        else the batch's error."""
        if len(inputs) > 1:
            for j, x in enumerate(inputs):
                try:
                    self.collate_fn([x])
                except Exception as e:
                    return j, e, False
        return 0, error, len(inputs) > 1


def _failed(group: Group, error: tuple[int, BaseException], whole: bool = False) -> Group:
    group.keys, group.inputs, group.collated = np.empty((0, 32), np.uint8), None, None
    group.error, group.batch_error = error, whole
    return group


def field_name(layer: str) -> str:
    """The store field of a layer: ``""`` → ``"output"``, other characters than ``[A-Za-z0-9_.-]`` → ``_``."""
    if layer == "":
        return "output"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
    if name[0] in ".-":
        name = "_" + name
    while name.startswith("__"):
        name = name[1:]
    if name.lower() == "zarr.json":
        name += "_"
    return name[:128]


def qualname(obj: Any) -> str | None:
    if obj is None:
        return None
    t = obj if isinstance(obj, type) else type(obj)
    if callable(obj) and hasattr(obj, "__qualname__") and not isinstance(obj, type):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return f"{t.__module__}.{t.__qualname__}"


class IterableWrapper(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def __iter__(self) -> Any:
        return iter(self.iterable)


#: The names a precompute record may give actstore's default collate (this module's, and earlier versions'),
#: or None (no collate recorded): a reader may use :func:`default_collate` without being given it.
DEFAULT_COLLATE_NAMES = frozenset({None, "actstore.precompute.loader.default_collate",
                                   "actstore.precompute.items.default_collate", "actstore.samples.default_collate",
                                   "torch.utils.data._utils.collate.default_collate"})


def default_collate(inputs: list[Any]) -> Any:
    """Batch raw model inputs: torch's ``default_collate``, except that dicts of keyword arguments with an
    ``attention_mask`` (token rows of different lengths, trimmed by :func:`~actstore.precompute.items.model_input`)
    are right-padded to the batch's longest row, with zeros (the mask hides them)."""
    if inputs and isinstance(inputs[0], str):
        raise TypeError("the model inputs are str: pass collate_fn= (for example a tokenizer call) to turn a list of "
                        "them into tensors")
    if inputs and isinstance(inputs[0], Mapping) and isinstance(inputs[0].get("attention_mask"), torch.Tensor):
        return pad_collate(inputs)
    return torch.utils.data.default_collate(inputs)


def pad_collate(inputs: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad and stack dicts of per-token tensors (each as long as its ``attention_mask``).  Always copies."""
    lengths = [len(x["attention_mask"]) for x in inputs]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for k in inputs[0]:
        vals = [x[k] for x in inputs]
        if all(v.ndim >= 1 and v.shape[0] == n for v, n in zip(vals, lengths, strict=True)):
            batch = vals[0].new_zeros((len(vals), width, *vals[0].shape[1:]))
            for i, v in enumerate(vals):
                batch[i, : len(v)] = v
            out[k] = batch
        else:
            out[k] = torch.utils.data.default_collate(vals)
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is not dict:
            with contextlib.suppress(Exception):  # keep a BatchEncoding a BatchEncoding
                return type(batch)(moved)  # type: ignore[call-arg]
        return moved
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch
