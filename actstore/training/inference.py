"""Inference from the store: run a trained head over a store's rows.

One store of recycled activations serves every task head trained on it
(a retrieval head, a classifier, a regressor): :func:`infer` runs a head over
all rows, or over the rows of given keys, in batches read with the same
zero-copy path and DataLoader workers as training, and returns the outputs as
one tensor or writes them to a new store under the same keys (for example the
fine-tuned sentence embeddings of a whole corpus).

Checks, before anything runs: the store's recorded fingerprint must be the
head's frozen part's (``frozen=``), or :class:`~actstore.StaleStoreError`; the
head's input field must be in the store, or ``KeyError`` listing the fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from actstore.deprecation import renamed_arguments
from actstore.engine.lifecycle.storeops import delete_store
from actstore.errors import StaleStoreError
from actstore.format.fields import Field
from actstore.models.blocks import Head
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.storage.objects import is_url
from actstore.store import ActivationStore, create
from actstore.store import open as open_store
from actstore.training.collate import ActivationCollate, PaddedBatch
from actstore.training.datasets import ActivationDataset, _open_read

__all__ = ["infer"]


def _input_field(store: ActivationStore, field: str | None) -> str:
    names = sorted(store.fields)
    if field is None:
        activations = [n for n in names if not n.startswith("item_")]
        if len(activations) != 1:
            raise KeyError(f"field: the store has {len(activations)} activation fields ({activations}); name the "
                           f"head's input with field=... (fields: {names})")
        return activations[0]
    if field not in store.fields:
        raise KeyError(f"field {field!r} is not in the store {store.path}; its fields are {names}")
    return field


def _check_frozen(store: ActivationStore, frozen: nn.Module | str | None, check: bool) -> None:
    if not check:
        return
    if frozen is None:
        raise TypeError("infer: pass frozen= (the frozen part from actstore.split, or its fingerprint) so the store "
                        "can be checked against the layers that computed it, or check_fingerprint=False")
    recorded = store.fingerprint
    if isinstance(frozen, str):
        ok, fp = recorded == frozen, frozen
    else:
        fp = frozen_fingerprint(frozen)
        ok = fingerprint_matches(recorded, fp, frozen)
    if not ok:
        have = f"{recorded[:16]}…" if recorded else "no fingerprint"
        raise StaleStoreError(
            f"{store.path}: the store was not computed by this head's frozen part (store: {have}, frozen part: "
            f"{fp[:16]}…); precompute a new store with the current frozen part, or pass check_fingerprint=False")


def _rows_of(store: ActivationStore, rows: Sequence[int] | np.ndarray | None, keys: Any) -> np.ndarray:
    if rows is not None and keys is not None:
        raise TypeError("infer: pass rows= or keys=, not both")
    n = len(store)
    if keys is not None:
        found = store.lookup(keys)
        missing = np.flatnonzero(found < 0)
        if missing.size:
            raise KeyError(f"keys: {missing.size} of {found.size} keys are not in the store {store.path} (first at "
                           f"position {int(missing[0])})")
        return found.astype(np.int64)
    if rows is None:
        return np.arange(n, dtype=np.int64)
    got = np.asarray(rows)
    if got.ndim != 1 or (got.size and got.dtype.kind not in "iu"):
        raise TypeError(f"rows: expected a 1-D sequence of row numbers, got {got.dtype} of shape {got.shape}")
    if got.size and (int(got.min()) < -n or int(got.max()) >= n):
        raise IndexError(f"rows: row numbers must be in [0, {n}) (or negative from the end); got {int(got.min())}.."
                         f"{int(got.max())}")
    return np.where(got < 0, got + n, got).astype(np.int64)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _unpadded(head: nn.Module) -> dict[str, Any]:
    """What tells a split head that a fixed field's rows have no padding (they were stored without a mask)."""
    get_base = getattr(head, "get_base_model", None)  # (a peft model around the head)
    base = get_base() if callable(get_base) else head
    return {"padding": False} if isinstance(base, Head) else {}


def _run(head: nn.Module, got: Any, device: torch.device) -> tuple[Any, torch.Tensor | None]:
    if isinstance(got, PaddedBatch):
        values, mask = got.values.to(device), got.mask.to(device)
        return head(values, mask), mask
    return head(got.to(device), **_unpadded(head)), None


def _pick(out: Any, output: Callable[[Any], Any] | None) -> torch.Tensor:
    picked = output(out) if output is not None else out
    if not isinstance(picked, torch.Tensor):
        raise TypeError(f"infer: the head returned {type(picked).__name__}, not a tensor; pass output=... to pick "
                        "one (e.g. output=lambda out: out.last_hidden_state)")
    return picked


def _per_row(y: torch.Tensor, mask: torch.Tensor | None, token_level: bool) -> list[torch.Tensor] | torch.Tensor:
    if not token_level:
        return y
    if mask is None or y.dim() < 2 or y.shape[:2] != mask.shape:
        raise ValueError(f"infer: token_level=True needs a (batch, tokens, ...) output over a ragged input field; got "
                         f"{tuple(y.shape)}")
    lengths = mask.bool().sum(1).tolist()
    return [y[i, : int(n)] for i, n in enumerate(lengths)]


@renamed_arguments(out_dtype="store_dtype")
def infer(head: nn.Module, store: ActivationStore | str | os.PathLike[str], field: str | None = None, *,
          frozen: nn.Module | str | None = None, rows: Sequence[int] | np.ndarray | None = None, keys: Any = None,
          batch_size: int = 256, num_workers: int = 0, progress: bool = True, out: str | os.PathLike[str] | None = None,
          out_field: str = "output", store_dtype: str | None = None, output: Callable[[Any], Any] | None = None,
          token_level: bool = False, dtype: torch.dtype = torch.float32, check_fingerprint: bool = True,
          overwrite: bool = False) -> torch.Tensor | list[torch.Tensor] | ActivationStore:
    """Run ``head`` over the rows of ``store`` (all, ``rows=`` or ``keys=``), in batches, in eval mode.

    Batches are read as in training: an :class:`~actstore.ActivationDataset`
    of the input field in a ``DataLoader`` (``num_workers`` processes) with
    :class:`~actstore.ActivationCollate`, one copy from the memory maps into
    the batch. A ragged field reaches the head as ``head(values, mask)``
    (the padded batch and its mask), a fixed one as ``head(values)``. The
    head runs under ``torch.inference_mode`` on the device of its parameters.

    Parameters
    ----------
    head : torch.nn.Module
        The trained head (from ``split``, adapted with :func:`actstore.lora`, or any module).
    store : ActivationStore or path
        The store the head's frozen part computed.
    field : str, optional
        The head's input field (default: the store's only activation field).
    frozen : torch.nn.Module or str
        The frozen part from ``split`` (or its :func:`frozen_fingerprint`);
        required unless ``check_fingerprint=False``.
    rows, keys : optional
        Row numbers, or 32-byte keys (each must be in the store); default: every row, in order.
    batch_size, num_workers : int
        DataLoader batch size and worker processes.
    progress : bool
        A tqdm progress bar.
    out : path, optional
        Write the outputs to a new store at ``out`` (field ``out_field``,
        stored as ``store_dtype``, default the output's dtype), each under its
        source row's key, and return that store (open for reading).
    output : callable, optional
        Picks the tensor from the head's output (e.g. ``lambda o: o.logits``).
    token_level : bool
        The output has one row per token (``(batch, tokens, ...)``): each row
        is trimmed to its real tokens by the mask (a list of tensors, or a
        ragged field in ``out``).
    dtype : torch.dtype
        Float dtype the stored states are cast to in the batch.
    check_fingerprint : bool
        Refuse a store that ``frozen`` did not compute (default).
    overwrite : bool
        Replace a store already at ``out``.  Only an actstore store (or an
        empty directory) is deleted; a directory holding anything else raises
        :class:`~actstore.StoreExistsError` naming it, and nothing is deleted.

    Returns
    -------
    torch.Tensor, list of torch.Tensor, or ActivationStore
        ``(n, ...)`` outputs in the order of the rows (always copies); a list
        with ``token_level``; the new store with ``out``.

    Raises
    ------
    StaleStoreError
        The store's fingerprint is not ``frozen``'s.
    KeyError
        ``field`` is not in the store (the message lists the fields), or a key is missing.
    TypeError
        No ``frozen`` while checking, both ``rows`` and ``keys``, or a head output that is not a tensor.

    Examples
    --------
    >>> frozen, head = actstore.split(model, 0.5)                       # doctest: +SKIP
    >>> emb = actstore.infer(head, "corpus.store", frozen=frozen)       # doctest: +SKIP
    >>> actstore.infer(head, "corpus.store", frozen=frozen, out="emb.store")  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    src = _open_read(store)
    name = _input_field(src, field)
    _check_frozen(src, frozen, check_fingerprint)
    order = _rows_of(src, rows, keys)
    dataset = ActivationDataset(src, fields=[name])
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=ActivationCollate(dtype, mask_dtype=torch.int64))
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="infer", total=len(batches), unit="batch", leave=False, dynamic_ncols=True)
    device = _device_of(head)
    results: list[Any] = []
    target: ActivationStore | None = None
    was = head.training
    head.eval()
    try:
        with torch.inference_mode():
            done = 0
            for batch in loader:
                y, mask = _run(head, batch[name], device)
                got = _per_row(_pick(y, output), mask, token_level)
                cpu: Any = [r.cpu() for r in got] if isinstance(got, list) else got.cpu()
                if out is None:
                    results.extend(cpu) if token_level else results.append(cpu)
                    continue
                if target is None:
                    target = _create_out(out, src, name, out_field, store_dtype, cpu, token_level, overwrite)
                target.append(src.key_at(order[done : done + len(cpu)]), {out_field: cpu})
                done += len(cpu)
    finally:
        head.train(was)
    if out is None:
        if token_level:
            return results
        return torch.cat(results) if results else torch.empty(0)
    if target is None:
        raise ValueError("infer: no rows to run (empty store or selection); nothing written")
    target.commit()
    path = target.path
    target.close()
    return open_store(path)


def _create_out(out: str | os.PathLike[str], src: ActivationStore, name: str, out_field: str, store_dtype: str | None,
                first: Any, token_level: bool, overwrite: bool) -> ActivationStore:
    sample = first[0]
    shape: tuple[int | None, ...] = tuple(sample.shape)
    if token_level:
        shape = (None, *shape[1:])
    dt = store_dtype or str(sample.dtype).removeprefix("torch.")
    if overwrite and not is_url(os.fspath(out)):
        delete_store(os.fspath(out), missing_ok=True)  # only a store (or an empty directory): else an error
    attrs = {"inference": {"source": str(src.path), "input_field": name, "source_fingerprint": src.fingerprint}}
    return create(out, {out_field: Field(shape, dt)}, attrs=attrs)
