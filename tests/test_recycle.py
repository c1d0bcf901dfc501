"""actstore.recycle(model, at, store): the same model, its lower blocks served from a store (issue 22, item 1).

Per family: outputs (real positions) and the loss equal the original's, a second
call is all hits and runs no frozen block, gradients reach only the head's
parameters and equal the unsplit model's with the lower blocks frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import actstore
from family_models import VOCAB_SIZE, token_batch

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _config(family: str, **kw: Any) -> Any:
    import transformers as tf

    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, **kw)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=4, n_head=4, n_positions=64, **kw)
    if family == "vit":
        return tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=64, **kw)
    raise ValueError(family)


def _model(cls_name: str, family: str, seed: int = 0, **kw: Any) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    return getattr(tf, cls_name)(_config(family, **kw)).eval()  # type: ignore[no-any-return]


def _labels_like(batch: dict[str, torch.Tensor], seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, batch["input_ids"].shape, generator=gen)
    return labels.masked_fill(batch["attention_mask"] == 0, -100)


class Custom(nn.Module):
    """A module under the custom protocol: ``embed``, then ``layers`` on the residual stream, then ``out``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)  # type: ignore[no-any-return]


# Each case: (build the model, the batch (kwargs), recycle options, the frozen block to watch)
def _text(lengths: list[int] = [5, 3, 7]) -> dict[str, torch.Tensor]:  # noqa: B006
    return token_batch(lengths)


def _unpadded() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB_SIZE, (3, 6), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any], dict[str, Any]]]] = {
    "BertModel": lambda: (_model("BertModel", "bert"), _text(), {}),
    "BertForSequenceClassification": lambda: (_model("BertForSequenceClassification", "bert", num_labels=3),
                                              {**_text(), "labels": torch.tensor([0, 2, 1])}, {}),
    "BertForTokenClassification": lambda: (_model("BertForTokenClassification", "bert", num_labels=3),
                                           {**_text(), "labels": _labels_like(_text())}, {}),
    "BertForQuestionAnswering": lambda: (_model("BertForQuestionAnswering", "bert"),
                                         {**_unpadded(), "start_positions": torch.tensor([1, 0, 4]),
                                          "end_positions": torch.tensor([3, 2, 6])}, {}),
    "LlamaForCausalLM": lambda: (_model("LlamaForCausalLM", "llama"), {**_text(), "labels": _labels_like(_text(), 3)},
                                 {}),
    "GPT2LMHeadModel": lambda: (_model("GPT2LMHeadModel", "gpt2"), {**_text(), "labels": _labels_like(_text(), 4)},
                                {"untie_weights": True}),
    "ViTForImageClassification": lambda: (_model("ViTForImageClassification", "vit", num_labels=3),
                                          {"pixel_values": torch.randn(3, 3, 16, 16,
                                                                       generator=torch.Generator().manual_seed(5)),
                                           "labels": torch.tensor([0, 1, 2])}, {}),
    "custom": lambda: (Custom().eval(), {"x": torch.randn(5, 6, generator=torch.Generator().manual_seed(6))},
                       {"blocks": "layers", "stem": "embed"}),
}


def _tensors(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"out": out}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def assert_same_outputs(got: Any, ref: Any, mask: torch.Tensor | None) -> None:
    """Every tensor of ``ref``'s output equals ``got``'s: at real positions for per-token tensors."""
    a, b = _tensors(got), _tensors(ref)
    assert set(b) <= set(a) and b, (sorted(a), sorted(b))
    for name, want in b.items():
        have = a[name]
        if mask is not None and want.ndim >= 2 and tuple(want.shape[:2]) == tuple(mask.shape):
            want, have = want[mask.bool()], have[mask.bool()]
        torch.testing.assert_close(have, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]


def _scalar(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    t = next(iter(_tensors(out).values()))
    if mask is not None and t.ndim >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        t = t[mask.bool()]
    return (t * t).sum()


def _first_linear(block: nn.Module) -> nn.Module:
    return next(m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv1d)) or type(m).__name__ == "Conv1D")


def _blocks(model: nn.Module) -> list[nn.Module]:
    for path in ("bert.encoder.layer", "encoder.layer", "model.layers", "transformer.h", "vit.layers",
                 "vit.encoder.layer", "layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise AssertionError(type(model).__name__)


class Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = _first_linear(module).register_forward_hook(self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_recycled_model_equals_the_original(case: str, tmp_path: Any) -> None:
    model, batch, opts = CASES[case]()
    mask = batch.get("attention_mask")
    if case == "GPT2LMHeadModel":  # the reference has its own LM head copy too (recycle unties it)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    ref_model = copy.deepcopy(model)
    blocks = _blocks(ref_model)
    for block in blocks[:2]:  # at=0.5 of 4 blocks: blocks 0 and 1 frozen, with the stem
        block.requires_grad_(False)
    for name, module in ref_model.named_modules():
        if name.split(".")[-1] in ("embeddings", "embed_tokens", "wte", "wpe", "embed"):
            module.requires_grad_(False)
    ref = ref_model(**batch)

    recycled = actstore.recycle(model, 0.5, tmp_path / "s", **opts)
    assert recycled is model and type(model).__name__ == type(ref_model).__name__
    assert isinstance(model, type(ref_model))
    counter = Counter(_blocks(model)[0])
    got = model(**batch)
    hits = model.recycle_stats["hits"]
    assert counter.calls == 1  # the misses: one frozen forward
    assert_same_outputs(got, ref, mask)
    model.commit()
    again = model(**batch)
    assert counter.calls == 1, "the frozen blocks ran on a batch whose rows are stored"
    assert model.recycle_stats["hits"] - hits == len(next(iter(batch.values())))
    assert_same_outputs(again, ref, mask)

    _scalar(again, mask).backward()
    _scalar(ref, mask).backward()
    ref_params = dict(ref_model.named_parameters())
    trained = 0
    for name, p in model.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name} got a gradient through the store"
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
        trained += 1
    assert trained > 0
    for p in _blocks(model)[0].parameters():
        assert p.grad is None
    model.close()
    assert type(model) is type(ref_model)
