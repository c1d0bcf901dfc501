"""Tests for actstore.keys: the spec in docs/FORMAT.md section 11, pinned byte for byte."""

from __future__ import annotations

import copy
import enum
import importlib
import inspect
import math
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actstore.format.keys import fingerprint, key, keys

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = b"actstore-key-v1\x00"

NUMPY_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


# --- an independent reference encoder, written from docs/FORMAT.md section 11 -----------


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def ref_array(name: str, shape: tuple[int, ...], data: bytes) -> bytes:
    dims = b"".join(u64(d) for d in shape)
    return b"a" + u64(len(name)) + name.encode() + u64(len(shape)) + dims + data


def ref(x: Any) -> bytes:
    """Canonical encoding of a sample (no domain prefix)."""
    if x is None:
        return b"N"
    if isinstance(x, bool):
        return b"?" + bytes([x])
    if isinstance(x, np.ndarray):
        le = x.astype(x.dtype.newbyteorder("<"))
        return ref_array(x.dtype.name, x.shape, le.tobytes(order="C"))
    if isinstance(x, int):
        b = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
        return b"i" + u64(len(b)) + b
    if isinstance(x, float):
        return b"f" + struct.pack("<d", x)
    if isinstance(x, str):
        b = x.encode("utf-8", "surrogatepass")
        return b"s" + u64(len(b)) + b
    if isinstance(x, (bytes, bytearray)):
        return b"y" + u64(len(x)) + bytes(x)
    if isinstance(x, (tuple, list)):
        tag = b"t" if isinstance(x, tuple) else b"l"
        return tag + u64(len(x)) + b"".join(ref(i) for i in x)
    if isinstance(x, dict):
        items = sorted((ref(k), ref(v)) for k, v in x.items())
        return b"d" + u64(len(items)) + b"".join(k + v for k, v in items)
    raise AssertionError(type(x))


def ref_key(x: Any) -> bytes:
    return blake3(DOMAIN + ref(x)).digest()


# --- golden vectors (the same table is in docs/FORMAT.md) ---------------------

GOLDEN: list[tuple[Any, str]] = [
    ("hello", "8c6e82c306a19155ba5a7569f166fae0f4ad0ea9492f78c02b9dc7d50823ec2e"),
    (-1, "089922c33518db5262049e1577cbfcd21540cca6f009c3f590fa5d67b0c2966a"),
    (
        np.arange(6, dtype=np.int32).reshape(2, 3),
        "3594c9534ba8983cb62b244ad9f6b520b56e1271806fafcbf9dbdb8e3426b1ba",
    ),
    (
        {"label": 1.5, "input_ids": [101, 102]},
        "fd8e6a41fda322f15c3a3265ee7fc0c9fa1a793e7556eb509397c7b3f54a38f7",
    ),
    (
        torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
        "36f41947cd93f2390d61b82304138a894f685218ca339197067b1c7fc07566ff",
    ),
]


@pytest.mark.parametrize(("sample", "hexkey"), GOLDEN)
def test_golden_vectors(sample: Any, hexkey: str) -> None:
    assert key(sample).hex() == hexkey


def test_golden_vectors_match_the_reference_encoder() -> None:
    for sample, hexkey in GOLDEN[:4]:
        assert ref_key(sample).hex() == hexkey
    bf16 = ref_array("bfloat16", (2,), bytes.fromhex("803f00c0"))  # 1.0, -2.0
    assert blake3(DOMAIN + bf16).hexdigest() == GOLDEN[4][1]


def test_golden_vectors_are_documented() -> None:
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    for _, hexkey in GOLDEN:
        assert f"`{hexkey}`" in doc
    worked = bytes.fromhex("61637473746f72652d6b65792d76310073050000000000000068656c6c6f")
    assert key("hello") == blake3(worked).digest()
    assert key(torch.arange(6, dtype=torch.int32).reshape(2, 3)).hex() == GOLDEN[2][1]


def test_golden_encoding_bytes() -> None:
    """The exact bytes of one nested sample, spelled out from the spec."""
    sample = {"b": (None, True), "a": [0.0]}
    expected = (
        DOMAIN
        + b"d" + u64(2)
        + b"s" + u64(1) + b"a" + b"l" + u64(1) + b"f" + bytes(8)
        + b"s" + u64(1) + b"b" + b"t" + u64(2) + b"N" + b"?\x01"
    )  # fmt: skip
    assert key(sample) == blake3(expected).digest()


# --- each scalar type against the reference ----------------------------------

SCALARS: list[Any] = [
    None, True, False, 0, 1, -1, 127, 128, -128, -129, 255, 2**64, -(2**100),
    0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e-310,
    "", "1", "héllo wörld", "\ud800", "?", ["\ud800", "\udfff"], "a\x00b",
    b"", b"1", bytearray(b"xyz"),
    (), [], {}, (1, "a"), [[1], 2], [1, [2]], {"k": [1, 2], 3: None, (1, 2): b"v"},
]  # fmt: skip


@pytest.mark.parametrize("sample", SCALARS, ids=repr)
def test_matches_reference_encoder(sample: Any) -> None:
    assert key(sample) == ref_key(sample)
    assert len(key(sample)) == 32


def test_all_scalars_distinct() -> None:
    ks = [key(s) for s in SCALARS]
    assert len(set(ks)) == len(ks)


def test_type_is_part_of_the_key() -> None:
    samples = [
        "1", 1, b"1", 1.0, True, np.int64(1), np.float64(1.0), np.array([1]),
        [1], (1,), {1: None}, None, (), [], {}, "", b"", 0, False, 0.0,
    ]  # fmt: skip
    ks = [key(s) for s in samples]
    assert len(set(ks)) == len(ks)


def test_length_prefixes_prevent_concatenation_collisions() -> None:
    assert key(("ab", "c")) != key(("a", "bc"))
    assert key([[1], 2]) != key([1, [2]])
    assert key([[], []]) != key([[[]]])
    assert key((b"\x00",)) != key((b"", b""))


def test_floats_are_keyed_by_their_bits() -> None:
    assert key(0.0) != key(-0.0)
    assert key(math.nan) == key(float("nan"))
    payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert math.isnan(payload)
    assert key(payload) != key(math.nan)
    assert key(payload) == blake3(DOMAIN + b"f" + struct.pack("<Q", 0x7FF8000000000001)).digest()


def test_subclasses_key_as_their_base_type() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        def __str__(self) -> str:
            return "other"

        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            return b"other"

    assert key(Color.RED) == key(1)
    assert key(Name("abc")) == key("abc")  # the slow path agrees with the fast path
    assert key(np.str_("abc")) == key("abc")
    assert key(np.bytes_(b"abc")) == key(b"abc")


def test_bytes_like_share_a_tag() -> None:
    data = bytes(range(24))
    k = key(data)
    assert key(bytearray(data)) == k
    assert key(memoryview(data)) == k
    assert key(np.frombuffer(data, np.float32).data) == k  # format ignored
    strided = np.arange(48, dtype=np.uint8).data[::2]
    assert key(strided) == key(bytes(range(0, 48, 2)))


# --- arrays and tensors -------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_and_torch_agree_for_every_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 4)) * 50).astype(dtype)
    t = torch.from_numpy(a.copy())
    assert key(a) == key(t) == ref_key(a)
    assert key(a) == key(t.t().contiguous().t())  # Fortran-strided tensor
    assert key(a[0, 0]) == key(t[0, 0]) == key(a[0, 0].copy())  # numpy scalar, 0-d
    assert key(a[0, 0]) == key(np.asarray(a[0, 0]))


def test_torch_bfloat16_encodes_its_bits() -> None:
    t = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.bfloat16)
    bits = t.view(torch.int16).numpy().astype("<i2").tobytes()
    assert key(t) == blake3(DOMAIN + ref_array("bfloat16", (1, 3), bits)).digest()
    assert key(t) != key(t.view(torch.int16))
    assert key(t) != key(t.view(torch.float16))
    assert key(t.t()) == key(t.t().contiguous())
    assert key(t.requires_grad_()) == key(t.detach())


@pytest.mark.parametrize("dtype", ["int8", "float32", "complex64", "bool"])
def test_layout_independence_numpy(dtype: str) -> None:
    base = (np.arange(60).reshape(3, 4, 5) % 7).astype(dtype)
    k = key(base)
    assert key(np.asfortranarray(base)) == k
    assert key(base.astype(base.dtype.newbyteorder(">"))) == k
    assert key(base[:, ::2]) == key(np.ascontiguousarray(base[:, ::2]))
    assert key(base[::-1]) == key(base[::-1].copy())
    assert key(base.transpose(2, 0, 1)) == key(base.transpose(2, 0, 1).copy())
    assert key(base.transpose(2, 0, 1)) != k  # same bytes, other shape
    wide = np.zeros((3, 4, 10), dtype)
    wide[:, :, ::2] = base
    assert key(wide[:, :, ::2]) == k


def test_layout_independence_torch() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert key(t[:, ::2]) == key(t[:, ::2].contiguous())
    assert key(t.t()) == key(t.t().contiguous())
    assert key(t.t().contiguous().t()) == key(t)
    assert key(torch.ones(1, 3).expand(4, 3)) == key(torch.ones(4, 3))
    assert key(t[1:3]) == key(t.numpy()[1:3])
    z = torch.tensor([1 + 2j, 3 - 4j])
    assert key(z.conj()) == key(z.conj().resolve_conj())
    assert key(z.conj()) != key(z)
    assert key(torch.zeros(0, 3)) != key(torch.zeros(3, 0))


def test_dtype_and_shape_are_part_of_the_key() -> None:
    assert key(np.ones(3, np.int8)) != key(np.ones(3, np.uint8))
    assert key(np.zeros(6, np.int8).reshape(2, 3)) != key(np.zeros(6, np.int8).reshape(3, 2))
    assert key(np.zeros((2, 3))) != key(np.zeros(6))
    assert key(np.zeros(0, np.float32)) != key(np.zeros(0, np.float64))
    assert key(np.float32(1)) != key(np.float64(1)) != key(1.0)
    assert key(np.array(1)) != key(np.array([1]))
    assert key(np.array([True])) != key(np.array([1], np.uint8))


def test_read_only_and_memory_mapped_arrays(tmp_path: Path) -> None:
    a = np.arange(10, dtype=np.float32)
    frozen = np.frombuffer(a.tobytes(), np.float32)
    assert not frozen.flags.writeable
    assert key(frozen) == key(a)
    a.tofile(tmp_path / "a.bin")
    mapped = np.memmap(tmp_path / "a.bin", np.float32, "r")
    assert key(mapped) == key(a)
    assert key(mapped[::3]) == key(a[::3].copy())


def test_bool_arrays_are_canonical() -> None:
    odd = np.array([2, 0, 255], np.uint8).view(np.bool_)  # truthy but not 0x01
    assert key(odd) == key(np.array([True, False, True]))


def test_contiguous_arrays_are_hashed_without_a_copy() -> None:
    big = np.ones((1024, 1024), np.float64)  # 8 MiB
    tracemalloc.start()
    try:
        key(big)
        key([big, {"a": big}])
        _, peak_in_place = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        key(big.T)  # Fortran order: must be copied once, and the probe sees it
        _, peak_copy = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_in_place < 1 << 20
    assert peak_copy >= big.nbytes


def test_threads_only_for_large_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``actstore.format.keys`` is also the batch function re-exported by the package, so
    # take the module from the import system rather than by attribute.
    module = importlib.import_module("actstore.format.keys")
    real = module.blake3
    threads: list[int] = []

    class Spy:
        AUTO = real.AUTO

        def __new__(cls, *args: Any, max_threads: int = 1) -> Any:
            threads.append(max_threads)
            return real(*args, max_threads=max_threads)

    monkeypatch.setattr(module, "blake3", Spy)
    key(["x", np.zeros(1000)])
    key(np.zeros(100_000, np.float64))  # 800 kB
    assert threads == [1, 1]
    key(["x", np.zeros(1 << 17, np.float64)])  # 1 MiB: restarts threaded
    assert threads[2:] == [1, real.AUTO]


def test_large_buffers_hash_threaded_with_the_same_result() -> None:
    big = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: takes the threaded path
    sample = ["x", {"big": big, "t": torch.from_numpy(big)}]
    assert key(sample) == ref_key(["x", {"big": big, "t": big}])
    assert key(big.tobytes()) == ref_key(big.tobytes())


# --- dicts and nesting --------------------------------------------------------


def test_dict_order_does_not_matter() -> None:
    a = {"x": 1, "y": [1, 2], 3: "z", (1, "t"): None, b"k": 2.5}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b)
    assert key(a) == key(b)
    assert key(a) != key({**a, "x": 2})
    assert key({"a": 1}) != key({"a": 1, "b": None})


@settings(deadline=None)
@given(
    st.dictionaries(st.text(max_size=5) | st.integers(), st.integers(), max_size=8),
    st.randoms(),
)
def test_dict_order_property(d: dict[Any, int], rnd: Any) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    assert key(dict(items)) == key(d)


def test_nested_arrays_keep_content_semantics() -> None:
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    s1 = {"input_ids": a, "mask": [torch.ones(2, dtype=torch.bool)], "meta": ("id", 7)}
    s2 = {
        "meta": ("id", 7),
        "mask": [np.ones(2, bool)],
        "input_ids": torch.from_numpy(a),
    }
    assert key(s1) == key(s2)
    assert key(s1) != key({**s1, "meta": ["id", 7]})  # tuple vs list


# --- unsupported values -------------------------------------------------------


class Foo:
    pass


@pytest.mark.parametrize(
    ("sample", "path", "what"),
    [
        (Foo(), "sample", "test_keys.Foo"),
        ([1, 2, {"img": Foo()}], "sample[2]['img']", "Foo"),
        ({"a": ({1, 2},)}, "sample['a'][0]", "set"),
        (iter(()), "sample", "tuple_iterator"),
        ([np.array(["a"])], "sample[0]", "dtype <U1"),
        (np.array([None]), "sample", "dtype object"),
        (np.array(["2020"], "datetime64[D]"), "sample", "datetime64"),
        (np.zeros(2, np.longdouble), "sample", "float128"),
        (np.zeros(2, [("a", "i4")]), "sample", "dtype"),
        (torch.zeros(2).to_sparse(), "sample", "layout"),
        (torch.zeros(2, device="meta"), "sample", "meta"),
        ({Foo(): 1}, "sample", "dict key"),
        (1j, "sample", "complex"),
        (np.ma.masked_array([1, 2], [False, True]), "sample", "masked"),
    ],
    ids=repr,
)
def test_unsupported_types_name_the_path(sample: Any, path: str, what: str) -> None:
    with pytest.raises(TypeError) as info:
        key(sample)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert what in message
    if "unsupported type" in message:
        assert "key_fn=" in message


def test_keys_reports_the_sample_index() -> None:
    with pytest.raises(TypeError, match=r"^samples\[1\]\['x'\]: unsupported type"):
        keys(["ok", {"x": Foo()}])
    with pytest.raises(TypeError, match="iterable of samples"):
        keys("abc")


def test_cycles_and_ambiguous_dict_keys_are_value_errors() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match=r"^sample\[1\]: .*cycle"):
        key(loop)
    shared = [1]
    assert key([shared, shared]) == key([[1], [1]])  # repetition is not a cycle
    with pytest.raises(ValueError, match="same encoding"):
        key({torch.tensor(1): "a", torch.tensor(1): "b"})


# --- hypothesis: key equality iff canonical value equality -------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | hnp.arrays(
        st.sampled_from(["int8", "uint8", "int32", "float32", "float64", "bool"]),
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
    )
)
hashable = st.none() | st.booleans() | st.integers() | st.text(max_size=4) | st.binary(max_size=4)
samples = st.recursive(
    leaves,
    lambda c: st.lists(c, max_size=4) | st.lists(c, max_size=4).map(tuple) | st.dictionaries(hashable, c, max_size=4),
    max_leaves=12,
)


def canon(x: Any) -> Any:
    """A structural value that is equal exactly when two samples should key equal."""
    if isinstance(x, np.ndarray):
        return (
            "a",
            x.dtype.name,
            x.shape,
            x.astype(x.dtype.newbyteorder("<")).tobytes(),
        )
    if isinstance(x, float):
        return ("f", struct.pack("<d", x))
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(canon(i) for i in x))
    if isinstance(x, dict):
        return ("d", frozenset((canon(k), canon(v)) for k, v in x.items()))
    return (type(x).__name__, x)


def relayout(x: Any, rnd: Any) -> Any:
    """The same content in another form: torch, strided, big-endian, reordered."""
    if isinstance(x, np.ndarray):
        choice = rnd.randrange(4)
        if choice == 0:
            return torch.from_numpy(x.copy())
        if choice == 1:
            return np.array(x, order="F")  # asfortranarray makes 0-d 1-d
        if choice == 2 and x.dtype.itemsize > 1:
            return x.astype(x.dtype.newbyteorder(">"))
        wide = np.zeros(x.shape + (2,), x.dtype)
        wide[..., 0] = x
        return wide[..., 0]
    if isinstance(x, (tuple, list)):
        return type(x)(relayout(i, rnd) for i in x)
    if isinstance(x, dict):
        items = [(k, relayout(v, rnd)) for k, v in x.items()]
        rnd.shuffle(items)
        return dict(items)
    return copy.copy(x)


@settings(max_examples=300, deadline=None)
@given(samples, samples)
def test_keys_equal_iff_canonical_values_equal(x: Any, y: Any) -> None:
    assert (key(x) == key(y)) == (canon(x) == canon(y))


@settings(max_examples=200, deadline=None)
@given(samples, st.randoms())
def test_equal_content_in_any_form_keys_equal(x: Any, rnd: Any) -> None:
    assert key(relayout(x, rnd)) == key(x) == key(copy.deepcopy(x))


# --- keys() -------------------------------------------------------------------


def test_keys_matches_key() -> None:
    batch: list[Any] = ["a", "", "héllo", "\ud800", 1, None, np.arange(3), {"k": [1.5]}]
    out = keys(batch)
    assert out.shape == (len(batch), 32) and out.dtype == np.uint8
    assert out.flags.writeable
    assert [bytes(r) for r in out] == [key(s) for s in batch]
    assert keys(iter(batch)).tobytes() == out.tobytes()
    assert keys([]).shape == (0, 32)


def test_keys_iterates_arrays_along_the_first_axis() -> None:
    a = np.arange(6).reshape(3, 2)
    assert [bytes(r) for r in keys(a)] == [key(row) for row in a]
    assert [bytes(r) for r in keys(torch.from_numpy(a))] == [key(row) for row in a]


@settings(deadline=None)
@given(st.lists(st.text(max_size=20), max_size=20))
def test_keys_fast_path_property(texts: list[str]) -> None:
    assert [bytes(r) for r in keys(texts)] == [ref_key(t) for t in texts]


# --- PIL ------------------------------------------------------------------------


def test_pil_images() -> None:
    image = pytest.importorskip("PIL.Image")
    pixels = bytes(range(12))
    gray = image.frombytes("L", (4, 3), pixels)
    assert key(gray) == key(image.frombytes("L", (4, 3), pixels))
    assert key(gray) != key(image.frombytes("L", (3, 4), pixels))
    assert key(gray) != key(pixels)
    pal = image.frombytes("P", (4, 3), pixels)
    assert key(pal) != key(gray)
    other = pal.copy()
    other.putpalette([255, 0, 0] * 256)
    assert key(other) != key(pal)
    mode = b"L"
    expected = (
        b"p" + u64(1) + mode + u64(4) + u64(3) + u64(0) + u64(12) + pixels
    )  # fmt: skip
    assert key(gray) == blake3(DOMAIN + expected).digest()
    assert key({"img": gray}) == key({"img": gray.copy()})


# --- fingerprint ----------------------------------------------------------------


def make_model() -> torch.nn.Module:
    """A small model; its source also runs in a subprocess (keep it self-contained)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(8, 2).to(torch.bfloat16),
    )
    model[0].register_buffer("scale", torch.ones(8), persistent=False)
    return model


def test_fingerprint_is_stable_across_processes() -> None:
    code = "from __future__ import annotations\nimport torch\n"
    code += inspect.getsource(make_model)
    code += "from actstore.format.keys import fingerprint\nprint(fingerprint(make_model()))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    fp = fingerprint(make_model())
    assert out.stdout.strip() == fp
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_fingerprint_changes_with_any_weight_element() -> None:
    model = make_model()
    fp = fingerprint(model)
    assert fingerprint(make_model()) == fp
    with torch.no_grad():
        w = model.get_parameter("0.weight")
        w[3, 2] = torch.nextafter(w[3, 2], torch.tensor(math.inf))
    assert fingerprint(model) != fp


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m[1].running_mean.add_(1e-3),  # a persistent buffer
        lambda m: m[1].num_batches_tracked.add_(1),
        lambda m: m[0].scale.mul_(2),  # a non-persistent buffer
        lambda m: m[4].bias.data.add_(1),  # a bfloat16 parameter
        lambda m: setattr(m[3], "p", 0.2),  # extra_repr
        lambda m: m.append(torch.nn.Identity()),  # structure, no parameters
        lambda m: m.__setitem__(2, torch.nn.GELU()),  # class of a submodule
        lambda m: m[0].to(torch.float64),  # dtype of a parameter
    ],
)
def test_fingerprint_changes_with_state_and_structure(edit: Any) -> None:
    model = make_model()
    fp = fingerprint(model)
    with torch.no_grad():
        edit(model)
    assert fingerprint(model) != fp


def test_fingerprint_matches_the_spec() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    s = {
        "modules": [
            ("", "torch.nn.modules.container.Sequential", ""),
            ("0", "torch.nn.modules.linear.Linear", "in_features=2, out_features=3, bias=True"),
            ("1", "torch.nn.modules.batchnorm.BatchNorm1d", model[1].extra_repr()),
        ],
        "parameters": {n: p.detach().numpy() for n, p in model.named_parameters()},
        "buffers": {n: b.numpy() for n, b in model.named_buffers()},
    }
    expected = b"actstore-fingerprint-v1\x00" + ref(s)
    assert fingerprint(model) == blake3(expected).hexdigest()


def test_fingerprint_of_a_module_holding_a_config_matches_the_spec() -> None:
    class Config:  # what fingerprint looks for: an object with to_dict, held as a module's .config
        sliding_window = 4
        rope_scaling = {"rope_type": "linear", "factor": 2.0}
        num_labels = 3  # the head's: not covered

        def to_dict(self) -> dict[str, Any]:
            return {}

    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    model[0].config = Config()
    s = {
        "modules": [("", "torch.nn.modules.container.Sequential", ""),
                    ("0", "torch.nn.modules.linear.Linear", "in_features=2, out_features=3, bias=True")],
        "parameters": {n: p.detach().numpy() for n, p in model.named_parameters()},
        "buffers": {},
    }
    legacy = blake3(b"actstore-fingerprint-v1\x00" + ref(s)).hexdigest()
    s["config"] = {"0": {"sliding_window": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}}
    assert fingerprint(model) == blake3(b"actstore-fingerprint-v2\x00" + ref(s)).hexdigest()
    assert fingerprint(model, legacy=True) == legacy
    Config.sliding_window = 8
    assert fingerprint(model) != blake3(b"actstore-fingerprint-v2\x00" + ref(s)).hexdigest()
    Config.num_labels = 9
    assert fingerprint(model, legacy=True) == legacy


def test_fingerprint_ignores_training_mode_and_grad() -> None:
    model = make_model()
    fp = fingerprint(model)
    model.eval()
    model.requires_grad_(False)
    assert fingerprint(model) == fp


def test_fingerprint_rejects_meta_modules() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"^module\['parameters'\]\['bias'\]: a meta tensor"):
        fingerprint(model)


# --- CUDA (skipped without a GPU) ---------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_and_modules() -> None:
    t = torch.randn(64, 33, dtype=torch.bfloat16)
    big = torch.randn(1 << 19)
    assert key(t.cuda()) == key(t)
    assert key(t.cuda().t()) == key(t.t())
    assert key([big.cuda()]) == key([big])
    model = make_model()
    assert fingerprint(model.cuda()) == fingerprint(make_model())
