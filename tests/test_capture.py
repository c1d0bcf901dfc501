"""Tests for actstore.capture: layer names, output reduction, hooks, early stop."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from actstore.models.capture import (
    FINAL_OUTPUT,
    LayerCapture,
    canonical_name,
    capture,
    model_arguments,
    reduce_output,
    resolve_layers,
    train_mode_matters,
)
from actstore.testing.models import bert_batch, tiny_bert, tiny_mlp, tiny_resnet, tiny_sentence_transformer


@contextmanager
def count_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Count how many times each module's forward starts."""
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():

        def pre_hook(mod: nn.Module, args: Any, name: str = name) -> None:
            counts[name] += 1

        handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# -- resolve_layers ----------------------------------------------------------------


def test_resolve_layers_normalises_and_dedupes() -> None:
    model = tiny_mlp()
    assert resolve_layers(model, "2") == ["2"]
    assert resolve_layers(model, ["4", "2", "4"]) == ["4", "2"]
    assert resolve_layers(model, None) == [FINAL_OUTPUT]
    assert resolve_layers(model, ("",)) == [FINAL_OUTPUT]


def test_resolve_layers_unknown_name_lists_close_matches() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match="no module named 'encoder.layers.2'") as info:
        resolve_layers(model, ["encoder.layer.1", "encoder.layers.2"])
    message = str(info.value)
    assert "'encoder.layer.2'" in message
    assert "named_modules()" in message


def test_resolve_layers_rejects_empty_and_non_str() -> None:
    model = tiny_mlp()
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers(model, [])
    with pytest.raises(TypeError, match="module names"):
        resolve_layers(model, [0])  # type: ignore[list-item]


def test_canonical_name_follows_property_alias() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())

        @property
        def alias(self) -> nn.Module:
            return self.model

    model = nn.Sequential(Wrapper())
    assert canonical_name(model, "0.alias.1") == "0.model.1"
    assert canonical_name(model, "0.model.1") == "0.model.1"
    assert canonical_name(model, "0.alias.7") is None
    assert resolve_layers(model, "0.alias.0") == ["0.model.0"]


# -- reduce_output -----------------------------------------------------------------


def test_reduce_output_picks_the_main_tensor() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    a, b = torch.zeros(2), torch.ones(3)
    assert reduce_output(a) is a
    assert reduce_output((None, a, b)) is a
    assert reduce_output([b, a]) is b
    assert reduce_output({"input_ids": b, "last_hidden_state": a}) is a
    assert reduce_output({"input_ids": b, "token_embeddings": a}) is a
    assert reduce_output({"x": 1, "y": b}) is b
    assert reduce_output(BaseModelOutputWithPooling(pooler_output=b, last_hidden_state=a)) is a

    @dataclasses.dataclass
    class Out:
        name: str
        logits: torch.Tensor

    assert reduce_output(Out("n", b)) is b


@pytest.mark.parametrize("value", ["text", None, (1, 2), {"a": 1}, 3.0])
def test_reduce_output_without_tensor_names_layer_and_type(value: object) -> None:
    with pytest.raises(TypeError, match=f"layer 'blk' returned {type(value).__name__}"):
        reduce_output(value, "blk")


# -- nn.Sequential -------------------------------------------------------------------


def test_sequential_capture_matches_manual_and_stops_early() -> None:
    model = tiny_mlp()
    x = torch.randn(4, 6)
    expected = model[2](model[1](model[0](x)))
    later = {name: model[int(name)] for name in ("3", "4", "5", "6")}
    with count_calls(later) as counts:
        out = capture(model, x, "2")
    assert list(out) == ["2"]
    torch.testing.assert_close(out["2"], expected, rtol=0, atol=0)
    assert counts == dict.fromkeys(later, 0)
    assert hook_count(model) == 0


def test_sequential_without_early_stop_runs_everything() -> None:
    model = tiny_mlp()
    x = torch.randn(4, 6)
    with count_calls({"6": model[6]}) as counts:
        out = capture(model, x, ["2"], stop_early=False)
    assert counts["6"] == 1
    torch.testing.assert_close(out["2"], model[:3](x))


def test_several_layers_any_order_stop_after_the_last_to_finish() -> None:
    model = tiny_mlp()
    x = torch.randn(4, 6)
    with count_calls({"4": model[4], "5": model[5]}) as counts:
        out = capture(model, x, ["3", "0"])
    assert list(out) == ["3", "0"]  # the requested order
    torch.testing.assert_close(out["0"], model[0](x))
    torch.testing.assert_close(out["3"], model[:4](x))
    assert counts == {"4": 0, "5": 0}


def test_final_output_is_a_full_forward() -> None:
    model = tiny_mlp()
    x = torch.randn(4, 6)
    out = capture(model, x)
    assert list(out) == [FINAL_OUTPUT]
    torch.testing.assert_close(out[FINAL_OUTPUT], model(x), rtol=0, atol=0)
    both = capture(model, x, ["1", ""])
    torch.testing.assert_close(both[""], model(x), rtol=0, atol=0)
    torch.testing.assert_close(both["1"], model[:2](x), rtol=0, atol=0)


def test_context_manager_reuses_hooks_and_removes_them() -> None:
    model = tiny_mlp()
    xs = [torch.randn(2, 6), torch.randn(5, 6)]
    with LayerCapture(model, "4") as cap:
        assert hook_count(model) == 1
        torch.testing.assert_close(model(xs[0]), model[:7](xs[0]))  # hooks idle outside run()
        outs = [cap.run(x)["4"] for x in xs]
        with pytest.raises(RuntimeError, match="not re-entrant"):
            cap.__enter__()
    assert hook_count(model) == 0
    for x, out in zip(xs, outs, strict=True):
        torch.testing.assert_close(out, model[:5](x))


def test_hooks_removed_when_forward_raises() -> None:
    model = tiny_mlp()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        capture(model, torch.randn(2, 7), "4")
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), LayerCapture(model, ["2", "4"]) as cap:
        cap.run(torch.randn(2, 7))
    assert hook_count(model) == 0


def test_layer_returning_no_tensor_raises_type_error_and_cleans_up() -> None:
    class Describe(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return f"shape {tuple(x.shape)}"

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.describe = Describe()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.describe(x)
            return self.lin(x)

    model = Model()
    with pytest.raises(TypeError, match="layer 'describe' returned str"):
        capture(model, torch.randn(2, 3), "describe")
    assert hook_count(model) == 0


def test_module_that_does_not_run_is_reported() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(RuntimeError, match=r"\['unused'\] exist in Model but did not run"):
        capture(Model(), torch.randn(2, 3), ["used", "unused"])


# -- ResNet --------------------------------------------------------------------------


def test_resnet_stage_capture_stops_before_later_stages() -> None:
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        expected = model.layer2(model.layer1(stem))
        later = {n: getattr(model, n) for n in ("layer3", "layer4", "avgpool", "fc")}
        with count_calls(later) as counts:
            out = capture(model, x, "layer2")
    torch.testing.assert_close(out["layer2"], expected, rtol=0, atol=0)
    assert counts == dict.fromkeys(later, 0)


def test_clone_protects_outputs_from_later_inplace_ops() -> None:
    # In a ResNet, bn1's output is modified in place by ReLU(inplace=True).
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        bn1 = model.bn1(model.conv1(x))
        assert (bn1 < 0).any()
        safe = capture(model, x, ["bn1", "layer1"])
        raw = capture(model, x, ["bn1", "layer1"], clone=False)
    torch.testing.assert_close(safe["bn1"], bn1, rtol=0, atol=0)
    assert not torch.equal(raw["bn1"], bn1)  # what clone=True protects against
    assert (raw["bn1"] >= 0).all()


# -- Hugging Face BERT -------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_bert_layer_capture_equals_hidden_states(k: int) -> None:
    model = tiny_bert()
    batch = bert_batch([5, 9, 7])
    with torch.inference_mode():
        full = model(**batch, output_hidden_states=True)
        later = {f"encoder.layer.{i}": model.encoder.layer[i] for i in range(k + 1, 4)}
        later["pooler"] = model.pooler
        hooks_before = hook_count(model)  # transformers installed its own recording hooks
        with count_calls(later) as counts:
            out = capture(model, batch, f"encoder.layer.{k}")
    assert out[f"encoder.layer.{k}"].is_inference()
    torch.testing.assert_close(out[f"encoder.layer.{k}"], full.hidden_states[k + 1], rtol=0, atol=0)
    assert counts == dict.fromkeys(later, 0)
    assert hook_count(model) == hooks_before


def test_bert_final_output_and_embeddings() -> None:
    model = tiny_bert()
    batch = bert_batch([4, 8])
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        out = capture(model, batch, ["embeddings", ""])
    torch.testing.assert_close(out[""], full.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out["embeddings"], full.hidden_states[0], rtol=0, atol=0)


def test_model_arguments_dispatch() -> None:
    bert = tiny_bert()
    batch = bert_batch([3])
    assert model_arguments(bert, batch) == ((), batch)
    mlp = tiny_mlp()
    features = {"x": torch.zeros(1)}
    args, kwargs = model_arguments(mlp, features)
    assert args[0] is features and kwargs == {}
    x = torch.zeros(1)
    assert model_arguments(mlp, (x, 1)) == ((x, 1), {})
    assert model_arguments(mlp, x) == ((x,), {})


# -- sentence-transformers ----------------------------------------------------------------


def test_sentence_transformer_capture_through_alias(tmp_path: Any) -> None:
    pytest.importorskip("sentence_transformers")
    model = tiny_sentence_transformer(tmp_path / "st")
    texts = ["the cat sat", "the big red dog ran far away and then slept"]
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    bert = model[0].auto_model
    with torch.no_grad():
        hidden = bert(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
        later = {f"layer{i}": bert.encoder.layer[i] for i in (2, 3)}
        later["pooling"] = model[1]
        with count_calls(later) as counts:
            out = capture(model, features, "0.auto_model.encoder.layer.1")
        sentence = capture(model, dict(features))[""]
        expected = model(dict(features))["sentence_embedding"]
    assert list(out) == ["0.model.encoder.layer.1"]
    torch.testing.assert_close(out["0.model.encoder.layer.1"], hidden[2], rtol=0, atol=0)
    assert counts == dict.fromkeys(later, 0)
    torch.testing.assert_close(sentence, expected, rtol=0, atol=0)


def test_train_mode_matters_only_with_dropout_or_batch_norm() -> None:
    mlp = tiny_mlp().train()
    assert not train_mode_matters(mlp)  # Linear and ReLU compute the same either way
    assert train_mode_matters(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).train())
    assert train_mode_matters(tiny_resnet().train())  # batch norm
    assert not train_mode_matters(tiny_resnet().eval())
    bert = tiny_bert().train()
    assert train_mode_matters(bert)
    bert.eval()
    assert not train_mode_matters(bert)
