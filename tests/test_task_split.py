"""split on Hugging Face task models: the head runs the task model's forward, loss included (tiny models, seconds)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from family_models import PAD, VOCAB_SIZE, image_batch, token_batch
from torch import nn

import actstore
from actstore.errors import HeadInputError, SplitError
from actstore.models.fingerprint import frozen_fingerprint

tf = pytest.importorskip("transformers")


def config(family: str, **kw: Any) -> Any:
    common: dict[str, Any] = {"attn_implementation": "sdpa"}
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, **common, **kw)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=64, **common, **kw)
    if family == "deberta-v2":
        return tf.DebertaV2Config(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                  position_buckets=16, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"],
                                  position_biased_input=False, **kw)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                             **{"pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 1, **common, **kw})
    if family in ("llama", "qwen2"):
        cls = tf.LlamaConfig if family == "llama" else tf.Qwen2Config
        return cls(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   **{"pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 1, **common, **kw})
    if family == "t5":
        return tf.T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16, **kw)
    if family == "vit":
        return tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=64, **common, **kw)
    raise ValueError(family)


def task_model(cls_name: str, family: str, seed: int = 0, **kw: Any) -> Any:
    kw.setdefault("num_labels", 3)
    torch.manual_seed(seed)
    return getattr(tf, cls_name)(config(family, **kw)).eval()


# (task model class, family, kind of labels)
CASES = [
    ("BertForSequenceClassification", "bert", "sequence"),
    ("BertForTokenClassification", "bert", "token"),
    ("BertForQuestionAnswering", "bert", "span"),
    ("DistilBertForSequenceClassification", "distilbert", "sequence"),
    ("DebertaV2ForSequenceClassification", "deberta-v2", "sequence"),
    ("GPT2LMHeadModel", "gpt2", "lm"),
    ("GPT2ForSequenceClassification", "gpt2", "sequence"),
    ("LlamaForCausalLM", "llama", "lm"),
    ("LlamaForSequenceClassification", "llama", "sequence"),
    ("Qwen2ForTokenClassification", "qwen2", "token"),
    ("T5ForTokenClassification", "t5", "token"),
    ("ViTForImageClassification", "vit", "image"),
]


def batch_and_labels(kind: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "image":
        return {"pixel_values": image_batch(3, seed)}, {"labels": torch.tensor([0, 2, 1])}
    batch = token_batch([3, 7, 5], seed=seed)
    mask = batch["attention_mask"]
    if kind == "sequence":
        return batch, {"labels": torch.tensor([0, 2, 1])}
    if kind == "span":
        return batch, {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([2, 6, 4])}
    labels = batch["input_ids"].clone() if kind == "lm" else torch.randint(0, 3, mask.shape, generator=gen)
    labels[mask == 0] = -100
    return batch, {"labels": labels}


def outputs(out: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if k != "loss" and isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(("cls_name", "family", "kind"), CASES, ids=[c[0] for c in CASES])
def test_the_head_of_a_task_model_returns_its_output_and_loss(cls_name: str, family: str, kind: str) -> None:
    model = task_model(cls_name, family, num_labels=2 if kind == "span" else 3)
    frozen, head = actstore.split(model, 0.5, untie_weights=cls_name == "GPT2LMHeadModel")
    batch, labels = batch_and_labels(kind)
    want = model(**batch, **labels)
    got = head(frozen(**batch), **labels)
    assert type(got) is type(want)
    mask = batch.get("attention_mask")
    for name, ref in outputs(want).items():
        value = got[name]
        if mask is not None and ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(mask.shape):
            ref, value = ref[mask.bool()], value[mask.bool()]  # the real tokens: padding is the collate's
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=0)
    assert math.isclose(float(got.loss.detach()), float(want.loss.detach()), abs_tol=1e-5)
    # The frozen part is the base model's: same states, same fingerprint, so one store serves both.
    prefix = model.base_model_prefix
    base_frozen = actstore.split(getattr(model, prefix), frozen.at[len(prefix) + 1:])[0]
    torch.testing.assert_close(frozen(**batch), base_frozen(**batch), atol=0, rtol=0)
    assert frozen_fingerprint(frozen) == frozen_fingerprint(base_frozen)
    # The head trains the task modules too; the two parts hold every parameter once.
    task = [p for n, c in model.named_children() if n != prefix for p in c.parameters()]
    head_ids, frozen_ids = {id(p) for p in head.parameters()}, {id(p) for p in frozen.parameters()}
    assert task and all(id(p) in head_ids for p in task)
    assert not head_ids & frozen_ids and head_ids | frozen_ids == {id(p) for p in model.parameters()}
    assert head.save_pretrained.__self__ is model and head.config is model.config


def test_the_head_takes_a_dict_batch_with_labels_and_the_states_under_the_models_input_name() -> None:
    model = task_model("BertForSequenceClassification", "bert")
    frozen, head = actstore.split(model, 0.5)
    batch, labels = batch_and_labels("sequence")
    states, mask = frozen(**batch).detach(), batch["attention_mask"]
    want = model(**batch, **labels)
    for got in (head({"hidden_states": states, "attention_mask": mask, **labels}),
                head(hidden_states=states, attention_mask=mask, **labels),
                head(input_ids=states.as_subclass(torch.Tensor), attention_mask=mask, **labels),  # CachedDataset's name
                head({"input_ids": states.as_subclass(torch.Tensor), "attention_mask": mask, **labels})):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        assert math.isclose(float(got.loss.detach()), float(want.loss.detach()), abs_tol=1e-6)
    tuple_out = head(states, mask, return_dict=False, **labels)
    assert isinstance(tuple_out, tuple) and math.isclose(float(tuple_out[0].detach()), float(want.loss.detach()), abs_tol=1e-6)


def test_the_heads_signature_is_what_trainers_inspect() -> None:
    from transformers.utils.generic import find_labels

    for name, family, labels in (("BertForSequenceClassification", "bert", ["labels"]),
                                 ("BertForQuestionAnswering", "bert", ["start_positions", "end_positions"])):
        head = actstore.split(task_model(name, family), 0.5)[1]
        params = inspect.signature(head.forward).parameters
        assert {"hidden_states", "attention_mask", "input_ids", *labels} <= set(params)
        assert find_labels(type(head)) == labels
    llama = task_model("LlamaForCausalLM", "llama")
    head = actstore.split(llama, 0.5)[1]
    assert head._get_name() == "LlamaForCausalLM"  # Trainer's label smoothing shifts causal labels by this name
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(head.forward).parameters.values())


@pytest.mark.parametrize(("cls_name", "family", "kind"), [
    ("LlamaForCausalLM", "llama", "lm"), ("BertForTokenClassification", "bert", "token")])
def test_token_labels_at_padding_are_refused_unless_minus_100(cls_name: str, family: str, kind: str) -> None:
    frozen, head = actstore.split(task_model(cls_name, family), 0.5)
    batch, labels = batch_and_labels(kind)
    states, mask = frozen(**batch), batch["attention_mask"]
    head(states, **labels)  # -100 at padding: fine
    raw = batch["input_ids"] if kind == "lm" else torch.zeros_like(batch["input_ids"])  # labels = ids, padding too
    with pytest.raises(HeadInputError, match=r"labels other than -100 at padded positions.*-100"):
        head(states, labels=raw)
    assert int(mask.sum()) < mask.numel()


@pytest.mark.parametrize(("cls_name", "family", "kind"), [
    ("LlamaForCausalLM", "llama", "lm"), ("BertForTokenClassification", "bert", "token"),
    ("Qwen2ForTokenClassification", "qwen2", "token")])
def test_token_labels_padded_to_max_length_give_the_unsplit_loss(cls_name: str, family: str, kind: str) -> None:
    model = task_model(cls_name, family)
    frozen, head = actstore.split(model, 0.5)
    batch, labels = batch_and_labels(kind)
    wide = torch.full((3, 16), -100)  # a tokenizer's padding="max_length": -100 past the batch's longest row
    wide[:, :7] = labels["labels"]
    got = head(frozen(**batch), labels=wide)  # cut to the states' width (the loss calls labels.view(-1))
    want = model(**batch, labels=labels["labels"])
    torch.testing.assert_close(got.loss, want.loss)


def test_span_positions_on_padding_are_refused() -> None:
    frozen, head = actstore.split(task_model("BertForQuestionAnswering", "bert", num_labels=2), 0.5)
    batch, labels = batch_and_labels("span")
    states = frozen(**batch)
    with pytest.raises(HeadInputError, match=r"start_positions\[0\] = 4 points at padding"):
        head(states, start_positions=torch.tensor([4, 0, 0]), end_positions=labels["end_positions"])
    width = states.shape[1]
    head(states, start_positions=torch.tensor([width + 3, 0, 0]), end_positions=labels["end_positions"])  # ignored


def test_inputs_the_states_replace_and_lower_layer_outputs_are_refused() -> None:
    frozen, head = actstore.split(task_model("BertForSequenceClassification", "bert"), 0.5)
    batch, labels = batch_and_labels("sequence")
    states = frozen(**batch)
    with pytest.raises(HeadInputError, match="input_ids=.*stored states take the place"):
        head(states, input_ids=batch["input_ids"])
    with pytest.raises(HeadInputError, match="input_ids=.*stored states take the place"):
        head(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # token ids, not states
    with pytest.raises(HeadInputError, match="output_hidden_states=True"):
        head(states, output_hidden_states=True)


def test_task_models_split_cannot_run_are_refused_with_the_reason() -> None:
    lm = task_model("GPT2LMHeadModel", "gpt2")
    with pytest.raises(SplitError, match="share weights.*lm_head.*untie_weights=True"):
        actstore.split(lm, 0.5)
    frozen, head = actstore.split(lm, 0.5, untie_weights=True)
    assert lm.lm_head.weight is not lm.transformer.wte.weight
    classifier = task_model("GPT2ForSequenceClassification", "gpt2", pad_token_id=1)  # pad = eos
    with pytest.raises(SplitError, match="pad_token_id=1, which is also its eos/bos id"):
        actstore.split(classifier, 0.5)
    choice = task_model("BertForMultipleChoice", "bert")
    with pytest.raises(SplitError, match="BertForMultipleChoice.*not one split runs"):
        actstore.split(choice, 0.5)


def items(n: int, seed: int = 0, width: int = 12) -> list[dict[str, Any]]:
    """Tokeniser-style items padded to ``width``, a label each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + i % (width - 3)
        ids = torch.full((width,), PAD, dtype=torch.int64)
        ids[:length] = torch.randint(2, VOCAB_SIZE, (length,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": (torch.arange(width) < length).long(), "labels": i % 3})
    return out


def stacked(data: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(d[k]) for d in data]) for k in data[0]}


def test_a_store_of_the_base_model_serves_the_task_head_and_the_reverse(tmp_path: Any) -> None:
    model = task_model("BertForSequenceClassification", "bert")
    data = items(12)
    collate = actstore.ActivationCollate(names={})
    frozen, head = actstore.split(model, "bert.encoder.layer.1")
    want = model(**stacked(data))
    # precomputed by the base model, served to the task model's head
    store = actstore.precompute(model.bert, data, tmp_path / "base", layers="encoder.layer.1", progress=False)
    ds = actstore.CachedDataset(data, store, model=frozen)
    got = head(**collate([ds[i] for i in range(len(ds))]))
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert math.isclose(float(got.loss.detach()), float(want.loss.detach()), abs_tol=1e-6)
    # precomputed by the task model, served to the base model's head
    store = actstore.precompute(model, data, tmp_path / "task", layers="bert.encoder.layer.1", progress=False)
    base_frozen, base_head = actstore.split(model.bert, "encoder.layer.1")
    ds = actstore.CachedDataset(data, store, model=base_frozen, input_name="hidden_states")
    batch = collate([ds[i] for i in range(len(ds))])
    pooled = base_head(batch["hidden_states"], batch["attention_mask"]).pooler_output
    torch.testing.assert_close(pooled, model.bert(**{k: v for k, v in stacked(data).items() if k != "labels"})
                               .pooler_output, atol=1e-5, rtol=0)


def _trainer_args(tmp_path: Any, **kw: Any) -> Any:
    return tf.TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, num_train_epochs=1,
                                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                **kw)


def test_trainer_trains_the_head_of_a_task_model_from_a_cached_dataset(tmp_path: Any) -> None:
    model = task_model("BertForSequenceClassification", "bert")
    data = items(32)
    store = actstore.precompute(model, data, tmp_path / "s", layers="bert.encoder.layer.1", progress=False)
    frozen, head = actstore.split(model, "bert.encoder.layer.1")
    ds = actstore.CachedDataset(data, store)  # items {"input_ids": states, "labels"}: the input's own key
    before = model.classifier.weight.detach().clone()
    frozen_before = [p.detach().clone() for p in frozen.parameters()]
    trainer = tf.Trainer(model=head.train(), args=_trainer_args(tmp_path), train_dataset=ds, eval_dataset=ds,
                         data_collator=actstore.ActivationCollate(names={}))  # remove_unused_columns: the default
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert not torch.equal(model.classifier.weight, before)  # the task model itself holds the trained head
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen.parameters(), strict=True))
    metrics = trainer.evaluate()
    head.eval()
    want = model.eval()(**stacked(data))
    assert math.isclose(metrics["eval_loss"], float(want.loss.detach()), abs_tol=1e-5)
    head.save_pretrained(tmp_path / "saved")  # the task model, trained head included, for plain transformers
    loaded = tf.BertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded(**stacked(data)).logits, want.logits, atol=1e-6, rtol=0)


def test_trainer_with_its_default_collator_on_fixed_size_states(tmp_path: Any) -> None:
    model = task_model("ViTForImageClassification", "vit")
    data = [{"pixel_values": image_batch(1, seed=i)[0], "labels": i % 3} for i in range(16)]
    frozen, head = actstore.split(model, 0.5)
    store = actstore.precompute(model, data, tmp_path / "s", layers=frozen.at, progress=False)
    before = model.classifier.weight.detach().clone()
    result = tf.Trainer(model=head.train(), args=_trainer_args(tmp_path),
                        train_dataset=actstore.CachedDataset(data, store)).train()  # Trainer's default collator
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert not torch.equal(model.classifier.weight, before)


def test_head_modules_are_the_task_models_own() -> None:
    model = task_model("BertForSequenceClassification", "bert")
    head = actstore.split(model, 0.5)[1]
    assert isinstance(head.task["classifier"], nn.Linear) and head.task["classifier"] is model.classifier


def test_trainer_trains_a_causal_lm_head_with_labels_padded_to_the_tokenizers_width(tmp_path: Any) -> None:
    model = task_model("LlamaForCausalLM", "llama")
    data = items(16)
    for item in data:  # labels as a tokenizer + DataCollatorForLanguageModeling give them: -100 at padding
        item["labels"] = item["input_ids"].masked_fill(item["attention_mask"] == 0, -100)
    frozen, head = actstore.split(model, 0.5)
    store = actstore.precompute(model, data, tmp_path / "s", layers=frozen.at, progress=False)
    ds = actstore.CachedDataset(data, store)
    trainer = tf.Trainer(model=head.train(), args=_trainer_args(tmp_path, per_device_eval_batch_size=len(data)),
                         train_dataset=ds, eval_dataset=ds, data_collator=actstore.ActivationCollate(names={}))
    want = model(**stacked(data))  # before training: the unsplit model's loss on the same items (padded to 12)
    assert math.isclose(trainer.evaluate()["eval_loss"], float(want.loss.detach()), abs_tol=1e-5)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    batch = actstore.ActivationCollate(names={})([ds[i] for i in range(4)])
    wide = batch["labels"].clone()
    wide[:, -1] = 5  # a label beyond the states' width: the loss would read padding
    assert wide.shape[1] == 12 > batch["input_ids"].shape[1] == 6
    with pytest.raises(HeadInputError, match="span 12 tokens and the states 6"):
        head(batch["input_ids"], batch["attention_mask"], labels=wide)
