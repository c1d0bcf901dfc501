"""Rows served: what the models layer checks so that a stored row is what the full model would compute.

Each test here pins one check of docs/GUARANTEES.md ("Rows served: what the models layer checks").
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import actstore
from actstore.engine.read.ragged import PaddedBatch
from actstore.errors import HeadInputError, LeftPaddingError, SplitError, StaleStoreError
from actstore.format.keys import fingerprint
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.models.split import SplitStates, check_batch, check_padding, head_arguments, split
from actstore.precompute.api import precompute
from tests.family_models import DECODERS, TEXT_FAMILIES, VOCAB_SIZE, image_batch, tiny, token_batch
from tests.precompute_helpers import pad_collate, token_lists

transformers = pytest.importorskip("transformers")

PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])


def packed_batch(mask: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(2, VOCAB_SIZE, PACKED.shape, generator=gen), "position_ids": PACKED}
    if mask:
        batch["attention_mask"] = torch.ones(PACKED.shape, dtype=torch.long)
    return batch


# -- item: every forward argument the upper blocks use reaches them ------------------------------------------


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_packed_position_ids_reach_the_head(family: str, with_mask: bool) -> None:
    model = tiny(family)
    batch = packed_batch(with_mask)
    frozen, head = split(model, 0.5)
    # The parts run without a key/value cache (use_cache=False), where transformers finds packed sequences.
    extra = {"use_cache": False} if family in DECODERS else {}
    with torch.no_grad():
        want = model(**batch, **extra).last_hidden_state
        states = frozen(**batch)
        got = head(states).last_hidden_state
        detached = head(states.detach().clone()).last_hidden_state
    assert isinstance(states, SplitStates) and states.position_ids is PACKED
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(detached, want, rtol=0, atol=1e-5)
    plain = states.as_subclass(torch.Tensor)
    with torch.no_grad():  # given by hand, as a keyword or in a dict
        by_hand = head(plain, batch.get("attention_mask"), position_ids=PACKED,
                       padding=None if with_mask else False).last_hidden_state
    torch.testing.assert_close(by_hand, want, rtol=0, atol=1e-5)


def test_position_ids_below_the_cut_are_not_applied_again() -> None:
    """GPT-2 and DistilBERT read position ids in the stem: their effect is in the states already."""
    for family in ("gpt2", "distilbert"):
        model = tiny(family)
        batch = token_batch([6, 6])
        batch["position_ids"] = torch.arange(3, 9).expand(2, -1)  # offsets, no packing
        frozen, head = split(model, 0.5)
        with torch.no_grad():
            want = model(**batch).last_hidden_state
            got = head(frozen(**batch)).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert head_arguments(model, batch) == {}


def test_head_arguments_name_what_a_store_cannot_hold() -> None:
    llama, bert, distil = tiny("llama"), tiny("bert"), tiny("distilbert")
    for model in (llama, split(llama, 0.5)[0]):
        assert set(head_arguments(model, packed_batch(True))) == {"position_ids"}
        with pytest.raises(HeadInputError, match="position_ids") as info:
            check_batch(model, packed_batch(True))
        assert isinstance(info.value, ValueError)
    default = token_batch([4, 4])
    default["position_ids"] = torch.arange(4)[None]
    assert head_arguments(llama, default) == {}
    check_batch(llama, default)
    assert head_arguments(bert, packed_batch(True)) == {}  # the mask decides, not the positions
    assert set(head_arguments(bert, packed_batch(False))) == {"position_ids"}  # packed sequences, no mask
    assert head_arguments(distil, packed_batch(False)) == {}  # only the stem reads them
    check_batch(distil, packed_batch(False))
    task = transformers.LlamaForCausalLM(llama.config).eval()  # a task model around a known base model
    with pytest.raises(HeadInputError):
        check_batch(task, packed_batch(True))


def test_frozen_part_refuses_a_key_value_cache() -> None:
    model = tiny("llama")
    frozen, _ = split(model, 0.5)
    cache = transformers.DynamicCache(config=model.config)
    with pytest.raises(SplitError, match="without a key/value cache"):
        frozen(**token_batch([3, 3]), past_key_values=cache)


# -- item: padding that changes a row is refused for every family --------------------------------------------


def _variants() -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [(f, None) for f in TEXT_FAMILIES]
    out.append(("roberta", "wrong pad id"))  # RoBERTa padded with an id that is not its pad id
    out.append(("deberta-v2", "absolute positions"))
    return out


def _model(family: str, variant: Any) -> Any:
    if variant == "absolute positions":
        cfg = tiny("deberta-v2").config
        cfg.position_biased_input = True
        torch.manual_seed(0)
        return transformers.DebertaV2Model(cfg).eval()
    return tiny(family)


@pytest.mark.parametrize(("family", "variant"), _variants())
def test_left_padding_is_refused_exactly_where_it_changes_a_row(family: str, variant: Any) -> None:
    model = _model(family, variant)
    pad = model.config.pad_token_id if family == "roberta" and variant is None else 0
    alone, padded = token_batch([3]), token_batch([3, 7], left=True, pad=pad)
    frozen, _ = split(model, 0.5)
    with torch.no_grad():
        differs = not torch.allclose(frozen(**padded)[0, -3:], frozen(**alone)[0], rtol=0, atol=1e-5)
    refused = False
    try:
        check_padding(model, padded)
        check_batch(model, padded)
    except LeftPaddingError:
        refused = True
    causal = family in DECODERS  # refused as a rule: positions count from the row's first token
    assert refused == (differs or causal), f"{family} {variant}: rows differ={differs}, refused={refused}"
    check_padding(model, token_batch([3, 7]))  # right padding: always fine


def test_left_padding_rules_cover_task_models_and_unverifiable_pad_ids() -> None:
    bert = tiny("bert")
    task = transformers.BertForSequenceClassification(bert.config).eval()
    with pytest.raises(LeftPaddingError, match="padding_side = 'right'"):
        check_padding(task, token_batch([3, 7], left=True)["attention_mask"])
    roberta = tiny("roberta")
    padded = token_batch([3, 7], left=True, pad=roberta.config.pad_token_id)
    check_padding(roberta, padded)
    with pytest.raises(LeftPaddingError, match="input_ids"):  # the mask alone cannot show the pad ids
        check_padding(roberta, padded["attention_mask"])
    check_padding(tiny("t5"), token_batch([3, 7], left=True)["attention_mask"])


# -- item: the head never runs a padded batch without its mask --------------------------------------------------


def _real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t[mask.bool()]


OPS = {
    "detach": lambda s: s.detach(),
    "clone": lambda s: s.clone(),
    "to cpu": lambda s: s.to("cpu"),
    "float16 round trip": lambda s: s.half().float(),
    "to dtype": lambda s: s.to(torch.float64).to(dtype=torch.float32),
    "bfloat16 via type": lambda s: s.type(torch.bfloat16),
    "contiguous": lambda s: s.contiguous(),
    "requires_grad_": lambda s: s.detach().requires_grad_(),
    "deepcopy": lambda s: copy.deepcopy(s),
}


@pytest.mark.parametrize("op", list(OPS))
def test_states_keep_their_mask_through_tensor_operations(op: str) -> None:
    model = tiny("bert")
    batch = token_batch([6, 2])
    mask = batch["attention_mask"]
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        states = frozen(**batch)
        moved = OPS[op](states)
        want = head(moved.as_subclass(torch.Tensor).float(), mask).last_hidden_state
        got = head(moved).last_hidden_state
    assert isinstance(moved, SplitStates) and torch.equal(moved.attention_mask, mask)
    torch.testing.assert_close(_real(got, mask), _real(want, mask), rtol=0, atol=0)
    if op in ("detach", "clone", "to cpu", "contiguous", "deepcopy"):
        full = model(**batch).last_hidden_state
        torch.testing.assert_close(_real(got, mask), _real(full, mask), rtol=1e-5, atol=1e-5)


def test_other_operations_give_plain_tensors_and_a_plain_tensor_needs_its_mask() -> None:
    model = tiny("bert")
    batch = token_batch([6, 2])
    mask = batch["attention_mask"]
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        states = frozen(**batch)
        full = model(**batch).last_hidden_state
    for other in (states[:1], states * 1, torch.cat([states, states])):
        assert type(other) is torch.Tensor  # rows may not be the batch's: the mask is not carried
    plain = states.as_subclass(torch.Tensor)
    with pytest.raises(HeadInputError, match=r"head\(states, attention_mask\)") as info:
        head(plain)
    assert isinstance(info.value, ValueError)
    with pytest.raises(HeadInputError):
        head(plain, None)
    with pytest.raises(HeadInputError):
        head({"hidden_states": plain})
    with pytest.raises(ValueError, match="padding=False"):
        head(plain, mask, padding=False)  # contradicts the mask
    with torch.no_grad():
        for form in (head(plain, mask), head(PaddedBatch(plain, mask.bool(), mask.sum(1))),
                     head({"hidden_states": plain, "attention_mask": mask})):
            torch.testing.assert_close(_real(form.last_hidden_state, mask), _real(full, mask), rtol=1e-5, atol=1e-5)
        unpadded = token_batch([4, 4])
        got = head(frozen(**unpadded).as_subclass(torch.Tensor), padding=False).last_hidden_state
        torch.testing.assert_close(got, model(**unpadded).last_hidden_state, rtol=1e-5, atol=1e-5)
        no_mask = {"input_ids": unpadded["input_ids"]}  # the frozen part ran without a mask: nothing to carry
        torch.testing.assert_close(head(frozen(**no_mask)).last_hidden_state, model(**no_mask).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_heads_that_read_no_mask_take_plain_tensors() -> None:
    vit = tiny("vit")
    frozen, head = split(vit, 0.5)
    with torch.no_grad():
        x = image_batch(2)
        torch.testing.assert_close(head(frozen(pixel_values=x).as_subclass(torch.Tensor)).last_hidden_state,
                                   vit(pixel_values=x).last_hidden_state, rtol=1e-5, atol=1e-5)
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    f, h = split(seq, "1")
    x = torch.randn(2, 3)
    torch.testing.assert_close(h(f(x).detach()), seq(x))


def test_head_attribute_pass_through_is_quiet_for_peft() -> None:
    model = tiny("llama")
    _, head = split(model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert head.is_gradient_checkpointing is False
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert head.is_gradient_checkpointing is True


# -- item: the fingerprint does not depend on the wrapper the frozen part is reached through --------------------


def _classifier() -> Any:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny("bert").config).eval()


def bump(module: nn.Module) -> None:
    with torch.no_grad():
        next(module.parameters()).add_(0.01)


def test_fingerprint_is_the_same_through_a_task_model() -> None:
    classifier = _classifier()
    frozen = split(classifier.bert, "encoder.layer.1")[0]
    fp = frozen_fingerprint(frozen)
    assert frozen_fingerprint(classifier, ["bert.encoder.layer.1"]) == fp
    assert frozen_fingerprint(classifier, ["encoder.layer.1"]) == fp  # named as in the base model
    assert frozen_fingerprint(classifier.bert, ["encoder.layer.1"]) == fp
    assert frozen_fingerprint(classifier, ["classifier"]) == fingerprint(classifier)  # a task module: all of it
    bump(classifier.classifier)  # training the task head keeps the store fresh
    bump(classifier.bert.encoder.layer[3])
    assert frozen_fingerprint(classifier, ["bert.encoder.layer.1"]) == fp
    bump(classifier.bert.encoder.layer[1])  # a frozen weight: stale, both ways
    assert frozen_fingerprint(classifier, ["bert.encoder.layer.1"]) != fp
    assert frozen_fingerprint(frozen) != fp
    # Stores written before recorded the task model's whole fingerprint: still accepted while it matches.
    assert fingerprint_matches(fingerprint(classifier), frozen_fingerprint(classifier, ["bert.encoder.layer.1"]),
                               classifier)


@pytest.mark.parametrize("direction", ["task model then frozen part", "frozen part then task model"])
def test_store_of_a_task_model_opens_with_its_frozen_part(tmp_path: Any, direction: str) -> None:
    classifier = _classifier()
    frozen = split(classifier.bert, "encoder.layer.1")[0]
    seqs = token_lists(6)
    if direction == "task model then frozen part":
        model, layers, check = classifier, "bert.encoder.layer.1", frozen
    else:
        model, layers, check = classifier.bert, "encoder.layer.1", classifier
    precompute(model, seqs, tmp_path / "s", layers=layers, collate_fn=pad_collate, progress=False)
    ds = actstore.CachedDataset(seqs, tmp_path / "s", model=check, collate_fn=pad_collate)
    assert len(ds) == len(seqs)
    bump(classifier.bert.encoder.layer[0])
    with pytest.raises(StaleStoreError):
        actstore.CachedDataset(seqs, tmp_path / "s", model=check, collate_fn=pad_collate)


# -- the stored path: precompute and RecycledEncoder refuse what a store cannot give back --------------------------


def test_precompute_and_the_encoder_refuse_packed_position_ids_a_head_needs(tmp_path: Any) -> None:
    """A store holds states, not position ids: packed Llama batches are refused before anything is stored."""
    model = tiny("llama")
    seqs = [list(range(2, 12)), list(range(12, 22))]

    def packed(items: list[Any]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(items)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": PACKED[: len(items)]}

    with pytest.raises(HeadInputError, match="position_ids"):
        precompute(model, seqs, tmp_path / "p", layers="layers.0", collate_fn=packed, progress=False)
    assert not (tmp_path / "p" / "zarr.json").exists() or len(actstore.open(tmp_path / "p")) == 0
    frozen, _ = split(model, 0.5)
    enc = actstore.RecycledEncoder(frozen, str(tmp_path / "e"), append=True, collate_fn=packed)
    with pytest.raises(HeadInputError, match="position_ids"):
        enc(seqs)
    # the default positions pass: the same batch without position ids is stored
    plain = precompute(model, seqs, tmp_path / "ok", layers="layers.0", collate_fn=pad_collate, progress=False)
    assert len(plain) == 2
