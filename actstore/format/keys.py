"""Content keys for samples and fingerprints for models (docs/FORMAT.md §11: this module is that section in code).

A sample's key is the 32-byte BLAKE3 digest of a canonical, type-tagged
encoding of its content (specified exactly in ``docs/FORMAT.md (section 11)``).  Equal content
gives equal keys whatever the memory layout, device or byte order: a numpy
array and a torch tensor with the same dtype, shape and values share a key.
Type, dtype and shape are part of the key, and the encoding is injective by
construction (tagged and length-prefixed), so distinct samples collide only if
BLAKE3 does.

Nothing here ever falls back to ``hash()``, ``repr()`` or pickle: an unsupported
value raises :class:`TypeError` naming where in the sample it sits.
"""

from __future__ import annotations

import functools
import itertools
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from blake3 import blake3

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_KEY_NAMES", "FORWARD_CONFIG", "fingerprint", "forward_config", "key", "keys"]

#: The names a precompute record may give the default key function (``key_fn`` unset): this module's, the
#: public alias, and the module path of earlier versions (``actstore.hashing``).
DEFAULT_KEY_NAMES = frozenset({None, "actstore.key", "actstore.format.keys.key", "actstore.hashing.key",
                               "actstore.keys.key"})

KEY_DOMAIN = b"actstore-key-v1\x00"
"""Prefix hashed before every sample encoding; bump the version to evolve."""
FINGERPRINT_DOMAIN = b"actstore-fingerprint-v1\x00"
"""Prefix hashed before a module's encoding in :func:`fingerprint` (a module with no :data:`FORWARD_CONFIG`)."""
FINGERPRINT_DOMAIN_V2 = b"actstore-fingerprint-v2\x00"
"""Prefix of a fingerprint that also covers the module's :data:`FORWARD_CONFIG`."""
FORWARD_CONFIG = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attention_window",
                  "attn_logit_softcapping", "query_pre_attn_scalar", "scale_attn_weights",
                  "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "rope_scaling", "rope_parameters",
                  "position_embedding_type", "use_bidirectional_attention", "scale_embedding",
                  "embedding_multiplier", "attention_multiplier", "residual_multiplier")
"""Attributes of a Hugging Face config that change what its modules compute but show in no weight, buffer or
``extra_repr()`` (read from the config by ``forward``): a model reloaded with the same weights and another
``sliding_window`` computes other rows.  Attributes of the head (``num_labels``, ``id2label``) are not listed."""
THREADED_MIN_BYTES = 1 << 20
"""Buffers at least this large are hashed with BLAKE3's multi-threaded mode.

Measured on the 2-core development machine, 100 MB: 1.8x faster when idle,
up to 0.7x when other processes hold the cores.  Set it to ``1 << 62`` to
stay single-threaded (the digest is the same either way).
"""

# One tag byte starts every encoded value (see docs/FORMAT.md (section 11)).
TAG_NONE = b"N"
TAG_BOOL = b"?"
TAG_INT = b"i"
TAG_FLOAT = b"f"
TAG_STR = b"s"
TAG_BYTES = b"y"
TAG_ARRAY = b"a"
TAG_IMAGE = b"p"
TAG_TUPLE = b"t"
TAG_LIST = b"l"
TAG_DICT = b"d"

_U64 = struct.Struct("<Q").pack
_F64 = struct.Struct("<d").pack
_STR_HEAD = KEY_DOMAIN + TAG_STR  # the fast path for the common str sample
_BIG_ENDIAN_HOST = sys.byteorder == "big"
# numpy dtypes with a canonical byte encoding (not longdouble: its padding
# bytes are uninitialised, so equal values could hash differently).
_NUMPY_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    + ["float16", "float32", "float64", "complex64", "complex128"]
)
_SUPPORTED = (
    "key() accepts str, bytes-like, bool, int, float, None, numpy arrays and "
    "scalars (bool/int/uint/float/complex dtypes), torch tensors, PIL images, and "
    "tuple/list/dict nesting of these. For other samples pass key_fn= to "
    "precompute() (any function returning a 32-byte key), or compute your own "
    "32-byte key, e.g. key() of a canonical str/bytes/array form of the sample."
)


class _Rejected(Exception):
    """Internal: a value cannot be keyed; carries the path while unwinding."""

    def __init__(self, message: str, error: type[Exception] = TypeError) -> None:
        super().__init__(message)
        self.message = message
        self.error = error
        self.path: list[str] = []

    def raise_as(self, root: str) -> None:
        where = root + "".join(reversed(self.path))
        raise self.error(f"{where}: {self.message}") from None


class _Restart(Exception):
    """Internal: a large buffer appeared; hash again with threads."""


class _Collect:
    """A hasher stand-in that keeps the encoded bytes (for dict keys)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def update(self, data: Any) -> None:
        self.parts.append(bytes(data))


class _Encoder:
    """Streams the canonical encoding of a value into ``sink.update``."""

    def __init__(self, sink: Any, threaded: bool) -> None:
        self.sink = sink
        self.threaded = threaded  # False: restart threaded on a large buffer
        self.active: set[int] = set()  # ids of the containers being encoded

    def big(self, nbytes: int) -> None:
        """Call before hashing (or copying to host) a buffer of ``nbytes``."""
        if nbytes >= THREADED_MIN_BYTES and not self.threaded:
            raise _Restart

    def encode(self, x: Any) -> None:
        update = self.sink.update
        t = type(x)
        if t is str:
            try:
                b = x.encode()
            except UnicodeEncodeError:  # lone surrogates: keep them, injectively
                b = x.encode("utf-8", "surrogatepass")
            update(TAG_STR + _U64(len(b)) + b)
        elif isinstance(x, bool):
            update(TAG_BOOL + (b"\x01" if x else b"\x00"))
        elif isinstance(x, np.generic) and not isinstance(x, (str, bytes)):
            self.array(np.asarray(x))
        elif isinstance(x, str):
            self.encode(str.__str__(x))
        elif isinstance(x, (bytes, bytearray, memoryview)):
            self.buffer(x)
        elif isinstance(x, int):
            n = int.__int__(x)
            b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            update(TAG_INT + _U64(len(b)) + b)
        elif isinstance(x, float):
            update(TAG_FLOAT + _F64(x))
        elif x is None:
            update(TAG_NONE)
        elif isinstance(x, np.ndarray):
            self.array(x)
        elif isinstance(x, (tuple, list, dict)):
            self.container(x)
        elif _is_tensor(x):
            self.tensor(x)
        elif _is_image(x):
            self.image(x)
        else:
            raise _Rejected(f"unsupported type {_qualname(t)}. {_SUPPORTED}")

    def buffer(self, x: bytes | bytearray | memoryview) -> None:
        mv = memoryview(x)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        mv = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
        self.big(mv.nbytes)
        self.sink.update(TAG_BYTES + _U64(mv.nbytes))
        self.sink.update(mv)

    def container(self, x: tuple[Any, ...] | list[Any] | dict[Any, Any]) -> None:
        if id(x) in self.active:
            raise _Rejected("the sample contains itself (a reference cycle)", ValueError)
        self.active.add(id(x))
        try:
            if isinstance(x, dict):
                self.mapping(x)
            else:
                self.sink.update((TAG_TUPLE if isinstance(x, tuple) else TAG_LIST) + _U64(len(x)))
                for i, item in enumerate(x):
                    try:
                        self.encode(item)
                    except _Rejected as e:
                        e.path.append(f"[{i}]")
                        raise
        finally:
            self.active.discard(id(x))

    def mapping(self, x: dict[Any, Any]) -> None:
        entries = []
        for k, v in x.items():
            collect = _Collect()
            sub = _Encoder(collect, threaded=True)
            sub.active = self.active
            try:
                sub.encode(k)
            except _Rejected as e:
                e.message = f"dict key {k!r}: {e.message}"
                raise
            entries.append((b"".join(collect.parts), k, v))
        entries.sort(key=lambda e: e[0])
        for (a, ka, _), (b, kb, _) in itertools.pairwise(entries):
            if a == b:
                raise _Rejected(
                    f"dict keys {ka!r} and {kb!r} have the same encoding; use keys that differ in content",
                    ValueError,
                )
        self.sink.update(TAG_DICT + _U64(len(entries)))
        for enc, k, v in entries:
            self.sink.update(enc)
            try:
                self.encode(v)
            except _Rejected as e:
                e.path.append(f"[{k!r}]")
                raise

    def array(self, a: np.ndarray[Any, Any], name: str | None = None) -> None:
        """Encode a numpy array (``name`` overrides its dtype name: bfloat16)."""
        dt = a.dtype
        if isinstance(a, np.ma.MaskedArray):
            raise _Rejected("a numpy masked array (its mask would be ignored); pass (a.data, a.mask)")
        if name is None:
            if dt.name not in _NUMPY_DTYPES or dt.fields is not None:
                raise _Rejected(
                    f"unsupported numpy dtype {dt} (only bool, int, uint, float16/32/64 "
                    "and complex64/128 have a canonical byte encoding). Convert the "
                    "array, or pass key_fn= to precompute()."
                )
            name = dt.name
        self.big(a.nbytes)
        shape = a.shape
        if dt.byteorder == ">" or (dt.byteorder == "=" and _BIG_ENDIAN_HOST):
            a = a.astype(dt.newbyteorder("<"))  # copies; canonical order is little
        flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # copies iff strided
        if dt.kind == "b" and flat.size and int(flat.max()) > 1:
            flat = (flat != 0).view(np.uint8)  # a True stored as 2 is still 0x01
        head = TAG_ARRAY + _U64(len(name)) + name.encode("ascii") + _U64(len(shape))
        self.sink.update(head + b"".join(_U64(d) for d in shape))
        self.sink.update(flat)

    def tensor(self, t: torch.Tensor) -> None:
        import torch

        table = _torch_dtypes()
        if t.dtype not in table:
            raise _Rejected(f"unsupported torch dtype {t.dtype}; convert the tensor first")
        if t.layout != torch.strided:
            raise _Rejected(f"unsupported tensor layout {t.layout}; call .to_dense() first")
        if t.device.type == "meta":
            raise _Rejected("a meta tensor has no data to key")
        name, view = table[t.dtype]
        self.big(t.numel() * t.element_size())  # before any copy to the host
        # Each step is a no-op when it can be; contiguous() before cpu(): one device copy.
        t = t.detach().resolve_conj().resolve_neg().contiguous().cpu()
        flat = t.reshape(-1)
        if view is not None:
            flat = flat.view(view)
        self.array(flat.numpy().reshape(t.shape), name)

    def image(self, im: Any) -> None:
        data = im.tobytes()  # PIL has no zero-copy view of its pixels
        self.big(len(data))
        mode = im.mode.encode("ascii")
        palette = bytes(im.getpalette("RGBA") or b"") if im.mode in ("P", "PA") else b""
        w, h = im.size
        self.sink.update(
            TAG_IMAGE + _U64(len(mode)) + mode + _U64(w) + _U64(h) + _U64(len(palette)) + palette + _U64(len(data))
        )
        self.sink.update(data)


@functools.cache
def _torch_dtypes() -> dict[Any, tuple[str, Any]]:
    """torch dtype -> (name, same-size dtype to view it as for numpy, or None)."""
    import torch

    table: dict[Any, tuple[str, Any]] = {}
    for name in sorted(_NUMPY_DTYPES):
        if hasattr(torch, name):
            table[getattr(torch, name)] = (name, None)
    table[torch.bfloat16] = ("bfloat16", torch.int16)  # numpy has no bfloat16
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
        if hasattr(torch, name):
            table[getattr(torch, name)] = (name, torch.uint8)
    return table


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor can exist unless torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def _is_image(x: Any) -> bool:
    if not type(x).__module__.startswith("PIL"):
        return False
    from PIL import Image  # only reached with a PIL object in hand

    return isinstance(x, Image.Image)


def _qualname(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _digest(value: Any, domain: bytes, root: str) -> blake3:
    """Hash ``domain`` then the encoding of ``value``; threaded if any buffer is large."""
    try:
        hasher = blake3(domain)
        _Encoder(hasher, threaded=False).encode(value)
    except _Restart:  # everything hashed so far was small; start over threaded
        hasher = blake3(domain, max_threads=blake3.AUTO)
        try:
            _Encoder(hasher, threaded=True).encode(value)
        except _Rejected as e:
            e.raise_as(root)
    except _Rejected as e:
        e.raise_as(root)
    return hasher


def key(sample: Any) -> bytes:
    """Return the 32-byte content key of one sample.

    The key is the BLAKE3 digest of ``KEY_DOMAIN`` followed by the canonical
    encoding of ``sample`` (``docs/FORMAT.md (section 11)``).  Contiguous arrays and tensors
    on the CPU are hashed in place (never copied); strided or big-endian arrays
    are copied once, CUDA tensors are copied to the host.

    Parameters
    ----------
    sample
        A str, bytes-like, bool, int, float, None, numpy array or scalar,
        torch tensor (any device, strides or dtype incl. bfloat16), PIL image,
        or a tuple/list/dict nesting of these.  Subclasses of these types key
        like their base type.

    Returns
    -------
    bytes
        32 bytes.

    Raises
    ------
    TypeError
        For an unsupported type or dtype; the message names the path inside
        the sample, e.g. ``sample[2]['img']``.
    ValueError
        For a container that contains itself, or a dict with two keys that
        encode identically.

    Examples
    --------
    >>> import numpy as np, torch
    >>> key(np.arange(3, dtype=np.int64)) == key(torch.arange(3))
    True
    >>> key("1") != key(1) != key(b"1")
    True
    """
    if type(sample) is str:
        try:
            b = sample.encode()
        except UnicodeEncodeError:
            b = sample.encode("utf-8", "surrogatepass")
        return blake3(_STR_HEAD + _U64(len(b)) + b).digest()
    return _digest(sample, KEY_DOMAIN, "sample").digest()


def keys(samples: Iterable[Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Return the keys of many samples as an ``(n, 32)`` uint8 array.

    Row ``i`` equals ``key(samples[i])``.  ``samples`` is iterated as any
    Python iterable: a 2-D array or tensor is iterated along its first axis,
    so each row is one sample (and ``keys(arr)`` is not ``key(arr)``).  Lists
    of str take a fast path.

    Parameters
    ----------
    samples
        Any iterable of samples that :func:`key` accepts; not a str or bytes.

    Returns
    -------
    numpy.ndarray
        A new, writable ``(n, 32)`` array of dtype uint8.

    Raises
    ------
    TypeError
        If ``samples`` is a str or bytes-like, or as :func:`key` does, with a
        path such as ``samples[3]['img']``.

    Examples
    --------
    >>> keys(["a", "b"]).shape
    (2, 32)
    """
    if isinstance(samples, (str, bytes, bytearray, memoryview)):
        raise TypeError(
            f"keys() takes an iterable of samples, got {type(samples).__name__}; "
            "use key() for one sample or wrap it in a list"
        )
    out = bytearray()
    head, pack, new = _STR_HEAD, _U64, blake3
    for i, s in enumerate(samples):
        if type(s) is str:
            try:
                b = s.encode()
            except UnicodeEncodeError:
                b = s.encode("utf-8", "surrogatepass")
            out += new(head + pack(len(b)) + b).digest()
        else:
            out += _digest(s, KEY_DOMAIN, f"samples[{i}]").digest()
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, 32)


def fingerprint(module: torch.nn.Module, *, legacy: bool = False) -> str:
    """Return a hex BLAKE3 digest of a module's structure and state.

    Covers every submodule of ``named_modules()`` in order (its name, class
    ``module.qualname`` and ``extra_repr()``), every parameter of
    ``named_parameters()`` and every buffer of ``named_buffers()`` (name,
    dtype, shape, values), non-persistent buffers included, and the
    :data:`FORWARD_CONFIG` attributes of each Hugging Face config its modules
    hold (:func:`forward_config`).  Not covered: ``training`` mode, hooks, and
    other plain attributes read by ``forward``.  ``legacy``: the fingerprint
    as written before the config was covered (what older stores record).
    Tensors are copied to the host one at a time (CUDA) or hashed in place
    (contiguous CPU).  Stable across processes: nothing depends on ids,
    addresses or hash randomisation, unless an ``extra_repr()`` prints one.

    Parameters
    ----------
    module
        Any ``torch.nn.Module``, on any device.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    TypeError
        If a parameter or buffer cannot be keyed (e.g. on the meta device).

    Examples
    --------
    >>> import torch
    >>> len(fingerprint(torch.nn.Linear(2, 3)))
    64
    """
    structure: dict[str, Any] = {  # a dict, so that errors read module['parameters']['0.weight']
        "modules": [(n, _qualname(type(m)), m.extra_repr()) for n, m in module.named_modules()],
        "parameters": dict(module.named_parameters()),
        "buffers": dict(module.named_buffers()),
    }
    config = {} if legacy else forward_config(module)
    if not config:  # (no such config: the fingerprint is what it always was)
        return _digest(structure, FINGERPRINT_DOMAIN, "module").hexdigest()
    structure["config"] = config
    return _digest(structure, FINGERPRINT_DOMAIN_V2, "module").hexdigest()


def forward_config(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The :data:`FORWARD_CONFIG` attributes of each distinct Hugging Face config (an object with ``to_dict``) held
    by ``module`` or a submodule as ``.config``, under the name of the first module holding it; configs without
    any of them are left out.  Values that are not plain JSON (None, bool, int, float, str, lists and dicts of
    those) are taken as their ``repr``."""
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, m in module.named_modules():
        cfg = m.__dict__.get("config")
        if cfg is None or id(cfg) in seen or not callable(getattr(cfg, "to_dict", None)):
            continue
        seen.add(id(cfg))
        values = {a: _plain(getattr(cfg, a)) for a in FORWARD_CONFIG if hasattr(cfg, a)}
        if values:
            out[name] = values
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)
