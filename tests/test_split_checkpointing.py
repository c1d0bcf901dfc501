"""Activation (gradient) checkpointing on the head, both of transformers' modes, every family (tiny models)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from family_models import TEXT_FAMILIES, image_batch, tiny, token_batch
from torch import nn

import actstore

tf = pytest.importorskip("transformers")

FAMILIES = [*TEXT_FAMILIES, "vit", "bert-classifier"]


def model_of(family: str) -> Any:
    if family == "bert-classifier":
        torch.manual_seed(0)
        config = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, num_labels=3)
        model = tf.BertForSequenceClassification(config)
    else:
        model = tiny(family)
    for module in model.modules():  # training mode (checkpointing runs only then), without randomness
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def head_gradients(family: str, reentrant: bool | None) -> tuple[dict[str, torch.Tensor], Any, Any]:
    model = model_of(family)
    frozen, head = actstore.split(model, 0.5)
    frozen_params = list(frozen.parameters())
    for p in frozen_params[::2]:  # a user who froze some of the frozen part, not all of it
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    if reentrant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if family == "vit":
        batch: dict[str, torch.Tensor] = {"pixel_values": image_batch(3)}
    else:
        batch = token_batch([3, 7, 5])
    with torch.no_grad():
        states = frozen(**batch)
    for _ in range(2):  # two steps: the second reads what the first left
        head.zero_grad()
        out = head(states) if family != "bert-classifier" else head(states, labels=torch.tensor([0, 2, 1]))
        if family == "bert-classifier":
            loss = out.loss
        else:
            pooled = getattr(out, "pooler_output", None)
            loss = out.last_hidden_state.pow(2).sum() + (0 if pooled is None else pooled.sum())
        loss.backward()
    assert [p.requires_grad for p in model.parameters()] == flags  # the frozen part is left as it was
    assert all(p.grad is None for p in frozen_params)  # and takes no gradient from the head
    grads = {n: p.grad for n, p in head.named_parameters() if p.grad is not None}
    return grads, model, head


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_head_has_the_gradients_of_the_plain_head(family: str, reentrant: bool) -> None:
    want, _, plain = head_gradients(family, None)
    got, model, head = head_gradients(family, reentrant)
    assert model.is_gradient_checkpointing and head.is_gradient_checkpointing
    assert set(got) == set(want) == {n for n, p in head.named_parameters() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=f"{family}: {name}")


def test_input_gradients_asked_by_the_model_reach_the_head() -> None:
    model = model_of("bert")
    frozen, head = actstore.split(model, 0.5)
    model.enable_input_require_grads()  # what peft does; the stem it hooks is a stand-in in the head's call
    seen: list[bool] = []
    head.layer["2"].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    head(frozen(**token_batch([3, 5])).detach()).last_hidden_state.sum().backward()
    assert seen == [True]
