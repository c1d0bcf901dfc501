"""Tiny Hugging Face models of every family split supports, built from configs (no downloads), seeded, eval mode."""

from __future__ import annotations

from typing import Any

import torch

VOCAB_SIZE = 50
PAD = 0


def _seeded(build: Any, config: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    model = build(config)
    return model.eval()


def tiny(family: str, seed: int = 0, attn: str = "sdpa") -> Any:
    """A small base model of ``family`` with random weights (eval mode)."""
    import transformers as tf

    common: dict[str, Any] = {"attn_implementation": attn}
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, **common)
        return _seeded(tf.BertModel, cfg, seed)
    if family == "roberta":
        cfg = tf.RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=70, pad_token_id=1, **common)
        return _seeded(tf.RobertaModel, cfg, seed)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64, **common)
        return _seeded(tf.DistilBertModel, cfg, seed)
    if family == "deberta-v2":
        cfg = tf.DebertaV2Config(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                 position_buckets=16, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"],
                                 position_biased_input=False)
        return _seeded(tf.DebertaV2Model, cfg, seed)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=4, n_head=4, n_positions=64, **common)
        return _seeded(tf.GPT2Model, cfg, seed)
    if family in ("llama", "mistral", "qwen2"):
        kw = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **common)
        config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaModel),
                                 "mistral": (tf.MistralConfig, tf.MistralModel),
                                 "qwen2": (tf.Qwen2Config, tf.Qwen2Model)}[family]
        return _seeded(model_cls, config_cls(**kw), seed)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16)
        return _seeded(tf.T5EncoderModel, cfg, seed)
    if family == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=64, **common)
        return _seeded(tf.ViTModel, cfg, seed)
    raise ValueError(family)


TEXT_FAMILIES = ["bert", "roberta", "distilbert", "deberta-v2", "gpt2", "llama", "mistral", "qwen2", "t5"]
DECODERS = ["gpt2", "llama", "mistral", "qwen2"]


def token_batch(lengths: list[int], *, left: bool = False, seed: int = 0, pad: int = PAD) -> dict[str, torch.Tensor]:
    """``{input_ids, attention_mask}`` padded to the longest row, on the right (default) or the left.

    Row ``i``'s real tokens depend only on ``seed`` and ``i``'s length order: the
    same tokens appear whatever the other rows, so a row can be compared alone.
    """
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        gen = torch.Generator().manual_seed(seed * 1000 + n)
        toks = torch.randint(2, VOCAB_SIZE, (n,), generator=gen)
        if left:
            ids[i, width - n:], mask[i, width - n:] = toks, 1
        else:
            ids[i, :n], mask[i, :n] = toks, 1
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 16, 16), generator=gen)
