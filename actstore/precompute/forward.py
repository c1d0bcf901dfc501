"""One forward of the frozen layers, and the device→host transfer of what they output.

:class:`Forward` runs the model (hooks capture the layers and stop the forward
after the last one) on a collated batch under ``torch.inference_mode()`` and
autocast, checks the outputs against the store's layer fields, and returns a
:class:`~actstore.precompute.background.Job` for the writer thread.  On a GPU it
also trims padding and casts on the device and starts the copy into pinned host
memory without waiting (the writer waits on the job's CUDA event); on the CPU
the writer thread trims and casts.

Token-level outputs — shape (batch, tokens, ...) with a token mask, the
batch's ``attention_mask`` or ``lengths_fn(batch)`` — are stored ragged, one
row per sample trimmed to its tokens; the first batch of a new store decides
each layer's field (:meth:`Forward.infer_fields`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.engine.write.validate import field_of
from actstore.format.fields import Field
from actstore.models.capture import LayerCapture
from actstore.models.split import attends_both_ways, check_batch
from actstore.precompute.background import CastCheck, Job, convert_output
from actstore.precompute.config import PrecomputeConfig
from actstore.precompute.loader import to_device

__all__ = ["Forward"]


class Forward:
    """The captured forward of one run: ``forward(batch, keys, sides, positions) -> Job``.

    Use it as a context manager (the hooks are registered inside).
    ``layer_fields`` (field → :class:`~actstore.Field`) are a resumed store's, or
    empty until the first batch of a new store infers them.
    """

    def __init__(self, model: nn.Module, cfg: PrecomputeConfig, layer_fields: Mapping[str, Field] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.device = cfg.execution.device
        self.fields = cfg.capture.fields  # layer -> field
        self.lengths_fn = cfg.capture.lengths_fn
        #: lengths_fn= over batches without a mask is only sound where padding cannot reach a real token's state
        self._padding_reaches = self.lengths_fn is not None and attends_both_ways(model)
        self._unmasked = True  # (the last batch had no attention_mask)
        self.capture = LayerCapture(model, cfg.capture.layers)
        self.layer_fields: dict[str, Field] = dict(layer_fields or {})

    def __enter__(self) -> Forward:
        self.capture.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.capture.__exit__(*exc)

    @property
    def ragged(self) -> set[str]:
        """The layer fields stored per token."""
        return {n for n, f in self.layer_fields.items() if f.ragged}

    def __call__(self, batch: Any, keys: np.ndarray, sides: list[Any], positions: list[int]) -> Job:
        mask = self._token_mask(batch)
        dev_batch = batch if self.device.type == "cpu" else to_device(batch, self.device)
        autocast = self.cfg.execution.autocast
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if autocast is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=autocast))
            captured = self.capture.run_inputs(dev_batch)
            outputs = {self.fields[layer]: t for layer, t in captured.items()}
            self._check_batch_first(outputs, len(keys))
            if not self.layer_fields:
                self.layer_fields = self.infer_fields(outputs, mask)
            self._check_outputs(outputs, mask)
            index, lengths = self._token_index(mask, outputs)
            job = Job(keys, outputs, index, lengths, sides, positions)
            if self.device.type == "cuda":
                self._to_host(job)
        return job

    def infer_fields(self, outputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, Field]:
        """A new store's layer fields, from the first batch's outputs."""
        storage = self.cfg.storage
        return {name: field_of(t[0], ragged=self._is_token_level(t, mask), dtype=storage.store_dtype,
                               compression=storage.compression, quantize=storage.quantize)
                for name, t in outputs.items()}

    def _token_mask(self, batch: Any) -> torch.Tensor | None:
        """The batch's token mask (bool, host), or its lengths when ``lengths_fn`` is given."""
        # Left padding would make rows batch-dependent, and position ids the head needs are not stored: refuse both.
        check_batch(self.model, batch)
        if self.lengths_fn is not None:
            self._unmasked = not (isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor))
            return torch.as_tensor(self.lengths_fn(batch), dtype=torch.int64).cpu()
        if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
            return batch["attention_mask"].cpu().bool()
        return None

    def _is_token_level(self, t: torch.Tensor, mask: torch.Tensor | None) -> bool:
        if mask is None or t.ndim < 3:
            return False
        return self.lengths_fn is not None or t.shape[1] == mask.shape[1]

    def _token_index(self, mask: torch.Tensor | None, outputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        ragged = self.ragged
        if not ragged:
            return None, None
        width = {outputs[f].shape[1] for f in ragged}
        if len(width) > 1:
            raise ValueError(f"token-level layers have different token counts {sorted(width)} in one batch")
        assert mask is not None
        if self.lengths_fn is not None:  # lengths, right padding
            lengths = mask
            w = width.pop()
            if self._padding_reaches and self._unmasked and bool((lengths < w).any()):
                raise ValueError(
                    f"lengths_fn=: a batch padded to {w} tokens without an attention_mask, and "
                    f"{type(self.model).__name__} attends to later tokens too, so each row's states depend on the "
                    "padding of its batch (its key, trimmed to the sample's tokens, does not say so); give the batch "
                    "an attention_mask (and drop lengths_fn), or precompute samples of equal length per batch")
            mask = torch.arange(w)[None, :] < lengths[:, None]
        lengths = mask.sum(1)
        return mask.reshape(-1).nonzero().squeeze(1), lengths

    def _check_batch_first(self, outputs: dict[str, torch.Tensor], n: int) -> None:
        for name, t in outputs.items():
            if t.ndim == 0 or t.shape[0] != n:
                raise ValueError(f"layer {self.cfg.capture.layer_of(name)!r}: output of shape {tuple(t.shape)} does "
                                 f"not start with the batch dimension ({n}); capture a layer whose output is batch-first")

    def _check_outputs(self, outputs: dict[str, torch.Tensor], mask: torch.Tensor | None) -> None:
        for name, t in outputs.items():
            f = self.layer_fields[name]
            layer = self.cfg.capture.layer_of(name)
            if f.ragged:
                if not self._is_token_level(t, mask):
                    raise ValueError(
                        f"layer {layer!r}: stored as token-level (ragged {f.shape}), but this batch gives "
                        f"{tuple(t.shape)} without a matching token mask (attention_mask or lengths_fn)")
                got, want = tuple(t.shape[2:]), f.inner_shape
            else:
                got, want = tuple(t.shape[1:]), f.inner_shape
            if got != want:
                raise ValueError(
                    f"layer {layer!r}: this batch's outputs have shape {got} per sample"
                    f"{' (per token)' if f.ragged else ''}, but earlier batches (field {name!r}) have {want}; a "
                    "fixed-shape field needs the same shape for every sample (pad or resize the inputs, or give "
                    "precompute a token mask if the layer is token-level)")

    def _to_host(self, job: Job) -> None:
        """GPU: trim and cast on the device, then copy to pinned memory without waiting."""
        out: dict[str, Any] = {}
        ragged = self.ragged
        job.checks = []
        for name, t in job.outputs.items():
            check = CastCheck(self.cfg.describe(name), self.cfg.storage.allow_overflow)
            job.checks.append(check)  # the writer thread checks the extremes once they are on the host
            v = convert_output(t, name in ragged, job.token_index, job.lengths, self.layer_fields[name].spec.torch,
                               check)
            src = v.values if name in ragged else v
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
            out[name] = type(v)(host, v.offsets) if name in ragged else host
        job.outputs, job.done = out, True
        job.event = torch.cuda.Event()
        job.event.record()
