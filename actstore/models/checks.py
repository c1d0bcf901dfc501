"""Whether a batch's stored rows would be its samples' own: padding and the head's forward arguments.

A stored row must not depend on the batch it was computed in, and must be all
the head needs. Two things break that, decided per family by the model's
:class:`~actstore.models.layout.BlockLayout`:

* **Left padding** shifts the real tokens' positions when the model counts
  positions from the row's first token (``left_padding == "refuse"``: BERT,
  DistilBERT, DeBERTa-v2 with ``position_biased_input``, GPT-2, Llama,
  Mistral, Qwen2). RoBERTa and its kin count positions over the tokens that are
  not the pad id (``"pad_ids"``): exact when the padding holds that id, which
  needs the ``input_ids`` to check. Relative positions (T5, DeBERTa-v2 without
  absolute positions) are not shifted (``"ok"``).
* **Position ids the upper blocks read** (``positions``): rotary decoders read
  ``position_ids`` in every block (``"blocks"``); BERT, RoBERTa and GPT-2 read
  them in the mask builder when no ``attention_mask`` is given (packed
  sequences, ``"mask"``). A store holds the frozen part's states, not the
  batch's position ids: a head trained from it would use the default ones.

The functions here take a layout; :mod:`actstore.models.split` finds the
layout of a model (``check_padding``, ``head_arguments``, ``check_batch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from actstore.errors import HeadInputError, LeftPaddingError
from actstore.models.layout import BlockLayout
from actstore.models.states import default_positions

__all__ = ["left_padding_error", "needed_arguments", "refuse_arguments", "refuse_mask_holes"]


def _left_padded(mask: torch.Tensor) -> torch.Tensor:
    """Rows of a 0/1 mask with a padding token before a real one."""
    real = mask != 0
    return (~real[:, :-1] & real[:, 1:]).any(dim=1)


def refuse_mask_holes(real: np.ndarray) -> None:
    """Refuse an ``(n, L)`` mask (bool) in which some sample's real tokens are not one run (a masked position
    between two real ones).  A row is keyed by a sample's real tokens, not by where they sit, and the frozen part's
    output depends on that (positions, attention), so two batches with one key could give different rows.

    Raises :class:`HeadInputError` naming the first such sample.
    """
    count = real.sum(1)
    first = real.argmax(1)
    last = real.shape[1] - 1 - real[:, ::-1].argmax(1)
    holes = np.flatnonzero((count > 0) & (last - first + 1 != count))
    if len(holes):
        j = int(holes[0])
        raise HeadInputError(
            f"sample {j} of the batch has an attention_mask with a hole (positions {int(first[j])}..{int(last[j])} "
            f"hold {int(count[j])} real tokens): a row is keyed by a sample's real tokens, not by where they sit, so "
            "the row stored under its key could differ from what the frozen part computes for another batch with "
            "the same key; collate each sample's tokens as one run (padding on the right or the left) and drop "
            "masked tokens from the ids instead of masking them in place")


def left_padding_error(layout: BlockLayout, mask: Any, input_ids: Any = None, pad_id: int | None = None,
                       model: str | None = None) -> LeftPaddingError | None:
    """The error for a left-padded batch that would change its rows under ``layout``, else ``None``.

    ``pad_id`` is the id the model's positions skip (``"pad_ids"`` families);
    ``input_ids`` the batch's token ids, whose padding must hold it; ``model``
    the model's name for the message (default: the layout's).
    """
    model = model or f"{layout.name} model"
    if layout.left_padding == "ok" or not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] < 2:
        return None
    bad = _left_padded(mask)
    if not bool(bad.any()):
        return None
    rows = bad.nonzero().flatten()[:5].tolist()
    where = f"the batch is left-padded (rows {rows} have padding before real tokens)"
    if layout.left_padding == "pad_ids":
        if isinstance(input_ids, torch.Tensor) and input_ids.shape == mask.shape and pad_id is not None:
            pads = input_ids.to(mask.device)[mask == 0]
            if bool((pads == pad_id).all()):
                return None
            why = f"its padding holds ids other than the model's pad id {pad_id}"
        else:
            why = "without the batch's input_ids the padding's ids cannot be checked"
        return LeftPaddingError(
            f"{where}: {model} counts positions over the tokens that are not its pad id "
            f"({pad_id}), and {why}, so the real tokens' positions would depend on the padding. Pad with "
            "the tokenizer (it uses the pad id) and pass the whole batch with its input_ids, or pad on the right."
        )
    return LeftPaddingError(
        f"{where}: {model} counts positions from the first token of the row, so left padding shifts "
        "the positions of the real tokens and their stored states would depend on the batch. Pad on the right "
        "(tokenizer.padding_side = 'right'); the stored rows are then the samples' own."
    )


def _packed(position_ids: torch.Tensor) -> bool:
    """Whether some row's positions restart (transformers' packed-sequence detection: a step other than 1)."""
    return position_ids.shape[-1] > 1 and bool((torch.diff(position_ids, dim=-1) != 1).any())


def needed_arguments(layout: BlockLayout, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The forward arguments of ``batch``, besides the states and the mask, that the head needs (non-default only).

    Empty when the head computes the same from the states and the mask alone.
    """
    positions = batch.get("position_ids")
    if not layout.positions or not isinstance(positions, torch.Tensor):
        return {}
    if layout.positions == "blocks":
        need = not default_positions(positions, positions.shape[-1])
    else:  # "mask": read only when there is no attention_mask, to find packed sequences
        need = batch.get("attention_mask") is None and _packed(positions)
    return {"position_ids": positions} if need else {}


def refuse_arguments(layout: BlockLayout, batch: Mapping[str, Any], model: str | None = None) -> None:
    """Raise :class:`HeadInputError` when ``batch`` has forward arguments the head needs but a store cannot hold."""
    model = model or f"{layout.name} model"
    needed = needed_arguments(layout, batch)
    if not needed:
        return
    where = ("every block reads them (rotary position embeddings)" if layout.positions == "blocks"
             else "its mask builder reads them when no attention_mask is given (packed sequences)")
    raise HeadInputError(
        f"the batch has non-default position_ids (packed sequences or offsets), and after the cut "
        f"{model} still uses them: {where}. A store holds the frozen part's states only, so a head "
        "trained from it would use the default positions and compute other numbers. Store one sequence per row "
        "(right-padded, default position_ids)"
        + (", or pass the attention_mask that separates them" if layout.positions == "mask" else "")
        + "; the live pair head(frozen(**batch)) carries them and is exact."
    )
