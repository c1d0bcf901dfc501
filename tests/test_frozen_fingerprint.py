"""The fingerprint of the frozen part only: training the head keeps a store fresh, a frozen weight makes it stale."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import actstore
from actstore.errors import LeftPaddingError, StaleStoreError
from actstore.format.keys import fingerprint
from actstore.models.fingerprint import fingerprint_matches, frozen_fingerprint
from actstore.models.split import split
from actstore.precompute.api import precompute
from actstore.testing.models import tiny_mlp
from tests.family_models import tiny
from tests.precompute_helpers import pad_collate, token_lists, vectors


def bump(module: torch.nn.Module) -> None:
    with torch.no_grad():
        next(module.parameters()).add_(0.01)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "vit"])
def test_head_training_keeps_it_and_frozen_changes_break_it(family: str) -> None:
    model = tiny(family)
    frozen, head = split(model, 0.5)
    fp = frozen_fingerprint(frozen)
    assert frozen_fingerprint(model, [frozen.at]) == fp
    for module in (head.layer["3"], *head.tail.values()):
        bump(module)  # what training the head does
    assert frozen_fingerprint(model, [frozen.at]) == fp
    assert fingerprint(model) != fingerprint(tiny(family))  # the whole model did change
    bump(frozen.layer["0"])
    assert frozen_fingerprint(model, [frozen.at]) != fp


def test_cut_follows_the_deepest_layer_and_falls_back_to_the_whole_model() -> None:
    model = tiny("bert")
    inside = frozen_fingerprint(model, ["encoder.layer.1.attention.output"])
    assert inside == frozen_fingerprint(model, ["encoder.layer.1"])  # the block holding it, never less
    assert frozen_fingerprint(model, ["encoder.layer.0", "encoder.layer.2"]) == frozen_fingerprint(model, "encoder.layer.2")
    assert frozen_fingerprint(model, None) == fingerprint(model)  # the final output: everything
    assert frozen_fingerprint(model, ["pooler"]) == fingerprint(model)  # off the main path
    seq = tiny_mlp()
    assert frozen_fingerprint(seq, ["3", "1"]) == fingerprint(seq[:4])
    custom = torch.nn.Linear(2, 2)
    assert frozen_fingerprint(custom, [""]) == fingerprint(custom)


def test_fingerprint_matches_accepts_the_whole_model_of_older_stores() -> None:
    model = tiny("llama")
    frozen, _ = split(model, 0.5)
    fp = frozen_fingerprint(frozen)
    assert fingerprint_matches(fp, fp, frozen)
    assert fingerprint_matches(fingerprint(model), fp, frozen)  # written before: the whole model
    assert fingerprint_matches(fingerprint(model), fp, model)
    assert not fingerprint_matches("0" * 64, fp, frozen)
    assert not fingerprint_matches(None, fp, frozen)


def test_precompute_resumes_after_head_training_and_refuses_changed_frozen_weights(tmp_path: Any) -> None:
    model, data = tiny_mlp(), vectors(30)
    path = tmp_path / "s"
    precompute(model, data[:20], path, layers="2", progress=False).close()
    bump(model[4])  # train the head (blocks after "2")
    store = precompute(model, data, path, layers="2", progress=False)  # fresh: adds the 10 new rows
    assert len(store) == 30 and store.fingerprint == fingerprint(model[:3])
    store.close()
    bump(model[0])  # a frozen weight
    with pytest.raises(StaleStoreError, match="another model"):
        precompute(model, data, path, layers="2", progress=False)


def test_precompute_opens_a_store_that_records_the_whole_model(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    run_module = importlib.import_module("actstore.precompute.run")

    model, data = tiny_mlp(), vectors(12)
    path = tmp_path / "old"
    with monkeypatch.context() as m:  # how stores were written before: the whole model's fingerprint
        m.setattr(run_module, "frozen_fingerprint", lambda model, layers: fingerprint(model))
        precompute(model, data[:6], path, layers="1", progress=False).close()
    assert actstore.open(path).fingerprint == fingerprint(model)
    store = precompute(model, data, path, layers="1", progress=False)
    assert len(store) == 12 and store.fingerprint == fingerprint(model)  # kept as recorded
    store.close()
    bump(model[4])
    with pytest.raises(StaleStoreError):
        precompute(model, data, path, layers="1", progress=False)  # the old record covers the whole model


def test_precompute_of_the_frozen_part_itself(tmp_path: Any) -> None:
    model = tiny("bert")
    seqs = token_lists(9)
    frozen, head = split(model, "encoder.layer.1")
    a = precompute(frozen, seqs, tmp_path / "a", collate_fn=pad_collate, batch_size=4, progress=False)
    b = precompute(model, seqs, tmp_path / "b", layers=frozen.at, collate_fn=pad_collate, batch_size=4,
                   progress=False)
    assert a.fingerprint == b.fingerprint == frozen_fingerprint(frozen)
    ra, rb = a.gather(a.view("dataset"))["output"], b.gather(b.view("dataset"))[frozen.at]
    assert torch.equal(ra.values, rb.values) and torch.equal(ra.lengths, rb.lengths)
    with torch.no_grad():  # the head reads the collated rows as they come
        out = head(b.gather_padded(b.view("dataset")[:4], frozen.at))
        want = model(**pad_collate(seqs[:4])).last_hidden_state
    mask = pad_collate(seqs[:4])["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_precompute_refuses_left_padded_decoder_batches_and_warns_about_train_mode(tmp_path: Any) -> None:
    model = tiny("gpt2")
    seqs = token_lists(6)
    with pytest.raises(LeftPaddingError, match="padding_side = 'right'"):
        precompute(model, seqs, tmp_path / "l", layers="h.1", collate_fn=lambda b: pad_collate(b, left=True),
                   progress=False)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = precompute(model, seqs, tmp_path / "r", layers="h.1", collate_fn=pad_collate, progress=False)
    assert model.training and len(store) == 6
    assert any("eval mode" in str(w.message) for w in caught)
    with torch.no_grad():  # the batch precompute ran (all six samples): bit for bit, whatever the BLAS kernels
        want = model.eval()(**pad_collate(seqs), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(store[int(store.view("dataset")[0])]["h.1"], want[0, : len(seqs[0])], rtol=0, atol=0)


def test_datasets_given_a_model_check_its_frozen_part(tmp_path: Any) -> None:
    """ActivationDataset / CachedDataset(model=...) accept a store after head training, refuse it after a frozen change."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    frozen, head = actstore.split(model, "1")
    data = [torch.randn(3) for _ in range(6)]
    actstore.precompute(model, data, tmp_path / "s", layers=["1"], progress=False).close()
    with torch.no_grad():
        head[0].weight.add_(1.0)  # training the head: the store stays valid
    assert len(actstore.ActivationDataset(tmp_path / "s", model=frozen)) == 6
    assert len(actstore.CachedDataset(data, tmp_path / "s", model=model)) == 6
    fp = actstore.open(tmp_path / "s").fingerprint
    assert len(actstore.CachedDataset(data, tmp_path / "s", fingerprint=fp)) == 6
    with torch.no_grad():
        model[0].bias.add_(1.0)  # a frozen weight changed: the stored rows are stale
    with pytest.raises(actstore.StaleStoreError, match="another frozen part"):
        actstore.ActivationDataset(tmp_path / "s", model=frozen)
    with pytest.raises(actstore.StaleStoreError, match="overwrite=True"):
        actstore.CachedDataset(data, tmp_path / "s", model=model)
    with pytest.raises(actstore.StaleStoreError):
        actstore.ActivationDataset(tmp_path / "s", fingerprint="0" * 64)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        actstore.ActivationDataset(tmp_path / "s", model="not a model")


def _gpt2(**kw: Any) -> Any:
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPT2Model(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, **kw)).eval()


def test_config_the_forward_reads_is_covered_and_the_heads_is_not(tmp_path: Any) -> None:
    # Same weights, another config attribute the frozen blocks read: other rows, so another fingerprint.
    base = _gpt2()
    scaled = _gpt2(scale_attn_by_inverse_layer_idx=True)
    assert dict(base.state_dict()).keys() == dict(scaled.state_dict()).keys()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), scaled.state_dict().values(), strict=True))
    fp = frozen_fingerprint(base, ["h.1"])
    assert frozen_fingerprint(scaled, ["h.1"]) != fp
    assert fingerprint(split(base, "h.1")[0], legacy=True) == fingerprint(split(scaled, "h.1")[0], legacy=True)
    relabelled = _gpt2(num_labels=7, id2label={i: str(i) for i in range(7)})  # the head's: not the frozen part's
    assert frozen_fingerprint(relabelled, ["h.1"]) == fp
    seqs = token_lists(6)
    precompute(base, seqs, tmp_path / "s", layers="h.1", collate_fn=pad_collate, progress=False).close()
    with pytest.raises(StaleStoreError, match="another model"):
        precompute(scaled, seqs, tmp_path / "s", layers="h.1", collate_fn=pad_collate, progress=False)
    with pytest.raises(StaleStoreError):
        actstore.recycle(scaled, "h.1", tmp_path / "s")
    with pytest.raises(StaleStoreError):
        actstore.CachedDataset(seqs, tmp_path / "s", collate_fn=pad_collate, model=split(scaled, "h.1")[0])


def test_stores_that_record_the_fingerprint_before_the_config_was_covered_still_open(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    run_module = importlib.import_module("actstore.precompute.run")
    model, seqs = _gpt2(), token_lists(8)
    frozen = split(model, "h.1")[0]
    old = fingerprint(frozen, legacy=True)
    assert old != frozen_fingerprint(frozen)  # a GPT-2 config holds attributes its forward reads
    with monkeypatch.context() as m:  # how stores were written before
        m.setattr(run_module, "frozen_fingerprint", lambda model, layers: old)
        precompute(model, seqs[:4], tmp_path / "s", layers="h.1", collate_fn=pad_collate, progress=False).close()
    assert fingerprint_matches(old, frozen_fingerprint(frozen), frozen)
    assert fingerprint_matches(old, frozen_fingerprint(model, ["h.1"]), model, ["h.1"])
    store = precompute(model, seqs, tmp_path / "s", layers="h.1", collate_fn=pad_collate, progress=False)
    assert len(store) == 8 and store.fingerprint == old  # resumed, its record kept
    store.close()
    assert len(actstore.CachedDataset(seqs, tmp_path / "s", collate_fn=pad_collate, model=frozen)) == 8
    bump(frozen.layer["0"])
    assert not fingerprint_matches(old, frozen_fingerprint(frozen), frozen)  # a frozen weight: stale either way
