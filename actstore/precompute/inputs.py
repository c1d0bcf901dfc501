"""Input keys: a row's identity is what reached the frozen part (docs/FORMAT.md §11.1).

A row is keyed by the **model inputs as fed**: the batch ``collate_fn``
returned (on the CPU, before it goes to the device) is split per sample, each
per-token tensor trimmed to the sample's real tokens, and the sample's key is
:func:`actstore.key` of that per-sample structure.  Whatever changes what the
model receives — a tokenizer, its truncation or ``max_seq_length``, an image
transform, a file's bytes that the collate loads — changes the key; padding
does not (left or right: the trim follows the mask, not a prefix).

How a batch is split (``n`` samples):

- a tensor (or numpy array) ``(n, ...)``: sample ``i`` is ``batch[i]``;
- a mapping (``dict``, a tokenizer's ``BatchEncoding``): sample ``i`` is a dict
  ``{name: value}``; tensors must start with the batch axis; with an
  ``attention_mask`` of shape ``(n, L)`` every tensor of shape ``(n, L, ...)``
  keeps the positions the sample's mask marks; Python scalars (``None``, bool,
  int, float, str) are batch-level constants and enter every sample's key
  as they are; anything else (a list, an object) is refused;
- a tuple or list of batch-first tensors: sample ``i`` is the same sequence of
  slices; a list of ``n`` other things (raw samples a module takes as a list)
  or the very inputs it was given: sample ``i`` is element ``i``;
- with ``lengths_fn(batch)`` (right-padded token batches without a mask), every
  batch-first tensor whose second dimension is the batch's token width (the
  largest one, at least the longest length) keeps ``[:length]``.

A batch that cannot be split (a tensor without the leading batch axis, a
list of another length) raises :class:`TypeError` naming ``key_fn=`` as the
way out: the weaker scheme that keys raw items.  Used by precompute (in the
DataLoader workers), :class:`~actstore.CachedDataset` (its check) and
:class:`~actstore.RecycledEncoder`, so that the three agree on every key.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from blake3 import blake3

from actstore.format.keys import KEY_DOMAIN, TAG_ARRAY, TAG_BOOL, TAG_DICT, TAG_FLOAT, TAG_INT, TAG_NONE, TAG_STR
from actstore.format.keys import key as content_key
from actstore.models.checks import refuse_mask_holes

__all__ = ["batch_signature", "check_recollated", "input_keys", "sample_inputs"]

_CONSTANTS = (type(None), bool, int, float, str)

_WAY_OUT = ("key the raw items instead with key_fn= (weaker: it does not see preprocessing or file changes), or make "
            "collate_fn return tensors that start with the batch axis")


def _is_array(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def _lead(v: Any) -> int | None:
    """The leading dimension of a tensor or array, None for a scalar one."""
    return int(v.shape[0]) if v.ndim >= 1 else None


def batch_signature(batch: Any) -> str:
    """The structure of a collated batch (its type, dict keys, tuple length): equal for every batch of one collate."""
    if isinstance(batch, Mapping):
        return f"mapping with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)) and batch and all(_is_array(v) for v in batch):
        return f"{type(batch).__name__} of {len(batch)} tensors"
    if _is_array(batch):
        return "tensor"
    return type(batch).__name__


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        t = v.detach()
        return t if t.device.type == "cpu" else t.cpu()
    return v


def _width(values: Sequence[Any], n: int, lengths: torch.Tensor) -> int:
    widths = [int(v.shape[1]) for v in values if _is_array(v) and v.ndim >= 2 and v.shape[0] == n]
    longest = int(lengths.max()) if len(lengths) else 0
    if not widths or max(widths) < longest:
        raise ValueError(f"lengths_fn gave a length of {longest}, but the batch has no token axis that long "
                         f"(second dimensions {sorted(set(widths))})")
    return max(widths)


def _splitter(v: Any, n: int, where: str, mask: torch.Tensor | None, lengths: list[int] | None,
              width: int | None) -> Callable[[int], Any]:
    """A function i -> sample i's part of the batch value ``v`` (a tensor or array)."""
    if _lead(v) != n:
        raise TypeError(f"collate_fn's batch{where} has shape {tuple(v.shape)}, without the leading batch axis of "
                        f"{n} samples: it cannot be split per sample to key each one; {_WAY_OUT}")
    if mask is not None and v.ndim >= 2 and tuple(v.shape[:2]) == tuple(mask.shape):
        keep = [mask[i] for i in range(n)]
        return lambda i: v[i][keep[i]]
    if lengths is not None and v.ndim >= 2 and v.shape[1] == width:
        return lambda i: v[i, : lengths[i]]
    return lambda i: v[i]


def sample_inputs(batch: Any, n: int, *, lengths_fn: Callable[[Any], Any] | None = None,
                  raw: Sequence[Any] | None = None) -> list[Any]:
    """Each sample's model input, cut out of the collated ``batch`` of ``n`` samples (see the module docstring).

    ``raw`` are the inputs the batch was collated from (a collate that hands
    them on as a list is split into them).  Returns views of the batch where it
    can (trimmed tokens are copies); CUDA tensors are copied to the host.
    Raises :class:`TypeError` for a batch that cannot be split per sample.
    """
    lengths: list[int] | None = None
    width: int | None = None
    mask: torch.Tensor | None = None
    if lengths_fn is not None:
        lt = torch.as_tensor(lengths_fn(batch), dtype=torch.int64).cpu().reshape(-1)
        if len(lt) != n:
            raise ValueError(f"lengths_fn returned {len(lt)} lengths for a batch of {n} samples")
        values = list(batch.values()) if isinstance(batch, Mapping) else \
            list(batch) if isinstance(batch, (tuple, list)) else [batch]
        width = _width(values, n, lt)
        lengths = lt.tolist()
    elif isinstance(batch, Mapping) and _is_array(batch.get("attention_mask")):
        m = torch.as_tensor(_cpu(batch["attention_mask"]))
        if m.ndim == 2 and m.shape[0] == n:
            mask = m.bool()
            refuse_mask_holes(mask.numpy())
    if _is_array(batch):
        return [*map(_splitter(_cpu(batch), n, "", mask, lengths, width), range(n))]
    if isinstance(batch, Mapping):
        parts: list[tuple[Any, Callable[[int], Any] | None, Any]] = []
        for k, v in batch.items():
            if _is_array(v):
                parts.append((k, _splitter(_cpu(v), n, f"[{k!r}]", mask, lengths, width), None))
            elif isinstance(v, _CONSTANTS):
                parts.append((k, None, v))  # a batch-level constant: every sample's model sees it
            else:
                raise TypeError(f"collate_fn's batch[{k!r}] is a {type(v).__name__}: only tensors (split per sample) "
                                f"and scalars (the same for every sample) can be keyed; {_WAY_OUT}")
        return [{k: (f(i) if f is not None else c) for k, f, c in parts} for i in range(n)]
    if isinstance(batch, (tuple, list)):
        if raw is not None and len(batch) == len(raw) and all(b is r for b, r in zip(batch, raw, strict=True)):
            return list(batch)  # the collate handed the inputs on as they were
        if batch and all(_is_array(v) and _lead(v) == n for v in batch):
            fs = [_splitter(_cpu(v), n, f"[{j}]", None, lengths, width) for j, v in enumerate(batch)]
            kind = type(batch) if type(batch) in (tuple, list) else tuple
            return [kind(f(i) for f in fs) for i in range(n)]
        if isinstance(batch, list) and len(batch) == n and not any(_is_array(v) for v in batch):
            return list(batch)  # a list of n samples, as a module that takes a list eats them
        raise TypeError(f"collate_fn returned a {type(batch).__name__} of {len(batch)} elements for {n} samples, which "
                        f"cannot be split per sample to key each one; {_WAY_OUT}")
    raise TypeError(f"collate_fn returned a {type(batch).__name__}, which cannot be split per sample to key each "
                    f"one; {_WAY_OUT}")


def input_keys(batch: Any, n: int, *, lengths_fn: Callable[[Any], Any] | None = None,
               raw: Sequence[Any] | None = None) -> np.ndarray:
    """The input key of each of the ``n`` samples of a collated ``batch``: an ``(n, 32)`` uint8 array (new).

    :func:`actstore.key` of each sample's part of the batch (:func:`sample_inputs`);
    tensors and dicts of tensors with a mask take a fast path that hashes the
    same bytes without building the per-sample structures.
    """
    if lengths_fn is None:
        fast = _fast_keys(batch, n)
        if fast is not None:
            return fast
    parts = sample_inputs(batch, n, lengths_fn=lengths_fn, raw=raw)
    buf = bytearray()
    for j, x in enumerate(parts):
        try:
            buf += content_key(x)
        except (TypeError, ValueError) as e:
            raise type(e)(f"sample {j} of the collated batch: {e}; {_WAY_OUT}") from e
    return np.frombuffer(bytes(buf), np.uint8).reshape(-1, 32).copy()


def check_recollated(batch: Any, keys: np.ndarray, raw: Sequence[Any], positions: Sequence[int],
                     lengths_fn: Callable[[Any], Any] | None, describe: Callable[[int], str] | None = None) -> None:
    """Refuse a batch collated again (with other samples) whose input keys differ from those computed before.

    A collate whose per-sample output depends on the other samples of its batch
    (padding the model sees, with no mask to trim it) would otherwise store a row
    computed from another input than its key says.  Raises :class:`ValueError`
    naming the first such dataset position (``describe(position)``, default ``dataset[position]``).
    """
    now = input_keys(batch, len(keys), lengths_fn=lengths_fn, raw=raw)
    bad = np.flatnonzero((now != keys).any(axis=1))
    if len(bad):
        p = int(positions[int(bad[0])])
        where = describe(p) if describe is not None else f"dataset[{p}]"
        raise ValueError(
            f"{where}: collate_fn gives this sample other model inputs when it is collated with other samples"
            f" ({len(bad)} of {len(keys)} in this batch): its rows would depend on the batch; give "
            "the batch an attention_mask (padding is then trimmed from the key and hidden from the model), pass "
            "lengths_fn=, or key the raw items with key_fn= (weaker: it does not see preprocessing changes)")


# -- the fast path: the bytes actstore.key hashes (docs/FORMAT.md §11), written directly ---------------------

_U64 = struct.Struct("<Q").pack
_FAST_DTYPES = frozenset(["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                          "float16", "float32", "float64"])


def _np(v: Any) -> np.ndarray | None:
    """A little-endian, canonical-dtype numpy view of a CPU tensor or array, or None (the general path)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.layout != torch.strided or v.requires_grad or v.is_conj() or v.is_neg():
            return None
        try:
            a = v.numpy()
        except (TypeError, RuntimeError):  # bfloat16, float8 ...
            return None
    elif isinstance(v, np.ndarray) and not isinstance(v, np.ma.MaskedArray):
        a = v
    else:
        return None
    if a.dtype.name not in _FAST_DTYPES or a.dtype.byteorder == ">" or sys.byteorder != "little" or a.ndim < 1:
        return None
    return a


def _constant(v: Any) -> bytes | None:
    """``enc(v)`` of docs/FORMAT.md §11 for a batch-level constant of an exact builtin type, else None."""
    t = type(v)
    if v is None:
        return TAG_NONE
    if t is bool:
        return TAG_BOOL + (b"\x01" if v else b"\x00")
    if t is int:
        b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return TAG_INT + _U64(len(b)) + b
    if t is float:
        return TAG_FLOAT + struct.pack("<d", v)
    if t is str:
        try:
            b = v.encode()
        except UnicodeEncodeError:
            b = v.encode("utf-8", "surrogatepass")
        return TAG_STR + _U64(len(b)) + b
    return None


def _fast_keys(batch: Any, n: int) -> np.ndarray | None:
    """Input keys of a tensor batch or a dict of tensors (trimmed by its mask) and constants, or None where this
    path does not apply (the general one then gives the same keys)."""
    if isinstance(batch, Mapping):
        items = list(batch.items())
        if not items or not all(type(k) is str for k, _ in items):
            return None
        consts = {k: _constant(v) for k, v in items if not _is_array(v)}
        if any(c is None for c in consts.values()):
            return None
        items = [(k, v) for k, v in items if k not in consts]
    elif _is_array(batch):
        items, consts = [(None, batch)], {}
    else:
        return None
    if not items:
        return None
    arrays = []
    for _, v in items:
        a = _np(v)
        if a is None or a.shape[0] != n:
            return None
        arrays.append(a)
    mask = None
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        if "attention_mask" in consts:
            return None
        m = arrays[[k for k, _ in items].index("attention_mask")]
        if m.ndim != 2:
            return None
        mask = m != 0
    width = 0 if mask is None else int(mask.shape[1])
    # Entries sorted by their encoded name, as actstore.key orders a dict.
    names = [b"" if k is None else _constant(k) or b"" for k, _ in items]
    const_entries = [(_constant(k) or b"", (_constant(k) or b"") + (c or b"")) for k, c in consts.items()]
    const_names = {name for name, _ in const_entries}
    order = range(len(items))
    if len(set(names) | const_names) != len(names) + len(consts):
        return None
    lengths = mask.sum(1) if mask is not None else None
    starts = None
    if mask is not None:  # right or left padding: each row's tokens are one run
        first = mask.argmax(1)
        idx = np.arange(width)[None, :]
        contiguous = (mask == ((idx >= first[:, None]) & (idx < (first + lengths)[:, None]))).all()
        if bool(contiguous):
            starts = first
        else:
            refuse_mask_holes(mask)
    heads = [TAG_ARRAY + _U64(len(a.dtype.name)) + a.dtype.name.encode() + _U64(a.ndim - 1) for a in arrays]
    token = [mask is not None and a.ndim >= 2 and a.shape[1] == width for a in arrays]
    rest = [b"".join(_U64(d) for d in a.shape[2:]) if t else b"".join(_U64(d) for d in a.shape[1:])
            for a, t in zip(arrays, token, strict=True)]
    top = TAG_DICT + _U64(len(items) + len(consts)) if isinstance(batch, Mapping) else b""
    # (encoded name, array index or -1, the constant entry's bytes) in the dict's canonical order
    plan = sorted([(names[j], j, b"") for j in order] + [(nm, -1, e) for nm, e in const_entries], key=lambda e: e[0])
    out = np.empty((n, 32), np.uint8)
    for i in range(n):
        h = blake3(KEY_DOMAIN + top)
        for _, j, entry in plan:
            if j < 0:
                h.update(entry)
                continue
            a = arrays[j]
            if token[j]:
                ln = int(lengths[i])  # type: ignore[index]
                if starts is not None:
                    s = int(starts[i])
                    row = a[i, s: s + ln]
                else:
                    row = a[i][mask[i]]  # type: ignore[index]
                h.update(names[j] + heads[j] + _U64(ln) + rest[j])
            else:
                row = a[i]
                h.update(names[j] + heads[j] + rest[j])
            h.update(np.ascontiguousarray(row).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out
