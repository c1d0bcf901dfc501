#!/usr/bin/env python
"""Fine-tune a head from the store with Hugging Face ``transformers.Trainer``, and with an ``accelerate`` loop.

The flow a Hugging Face user already has, with the frozen part recycled:

1. Tokenised items as a tokeniser makes them (``input_ids``, ``attention_mask``,
   ``token_type_ids`` padded to ``max_length``, and ``labels``) go to
   ``actstore.precompute`` as they are: the forward arguments are passed as
   keyword arguments, the padding is trimmed, ``labels`` becomes a side column.
2. ``actstore.split(classifier, at)`` cuts the classifier itself at the stored
   layer: its head runs the classifier's own forward (upper layers, pooler,
   classifier, loss), so ``head(hidden_states, attention_mask, labels=...)``
   returns a ``SequenceClassifierOutput`` with its loss, as Trainer expects.
3. ``CachedDataset(items, store)`` serves ``{"input_ids": states, "labels"}``
   items (the input's own key); ``Trainer`` (default ``remove_unused_columns``)
   trains the head with ``data_collator=actstore.ActivationCollate(names={})``,
   which pads the states and adds ``attention_mask``. The trained weights are the
   classifier's own: ``classifier.save_pretrained`` writes a normal model.
4. The same dataset through ``accelerate.Accelerator().prepare(loader)`` in a
   plain loop.

By default it builds a tiny random BERT and random token ids (seconds on a
CPU); ``--model`` takes a local checkpoint directory instead.  Run::

    python scripts/trainer_head.py --out /tmp/trainer-head
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if __package__ in (None, ""):  # run from a checkout: make `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actstore  # noqa: E402


def tiny_classifier(labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=labels)
    return BertForSequenceClassification(config).eval()


def items(n: int, max_length: int = 16, labels: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Tokeniser-style items padded to ``max_length``; the label is a function of the first token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, max_length + 1, (1,), generator=gen))
        ids = torch.zeros(max_length, dtype=torch.int64)
        ids[:length] = torch.randint(5, 40, (length,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": (torch.arange(max_length) < length).long(),
                    "token_type_ids": torch.zeros(max_length, dtype=torch.int64), "labels": int(ids[0]) % labels})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for the store and Trainer's output (default: a temporary one)")
    p.add_argument("--items", type=int, default=96)
    p.add_argument("--at", default="bert.encoder.layer.1", help="the last frozen block (a split point of the classifier)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    out = args.out or tempfile.mkdtemp(prefix="trainer-head-")
    model = tiny_classifier()
    data = items(args.items)
    store = actstore.precompute(model, data, os.path.join(out, "store"), layers=args.at, progress=False)
    ds = actstore.CachedDataset(data, store)
    collate = actstore.ActivationCollate(names={})
    trainer_model = actstore.split(model, args.at)[1].train()
    training = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=16,
                                 num_train_epochs=args.epochs, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 use_cpu=True, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=trainer_model, args=training, train_dataset=ds, data_collator=collate)
    result = trainer.train()
    # the same dataset in a plain accelerate loop
    accelerator = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate)
    acc_model = actstore.split(tiny_classifier(), args.at)[1].train()
    opt = torch.optim.AdamW(acc_model.parameters(), lr=1e-3)
    acc_model, opt, loader = accelerator.prepare(acc_model, opt, loader)
    losses = []
    for batch in loader:
        loss = acc_model(**batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    summary = {"store": store.path, "rows": len(store), "trainer_loss": float(result.training_loss),
               "trainer_steps": int(result.global_step), "accelerate_steps": len(losses),
               "accelerate_loss": sum(losses) / max(len(losses), 1), "checked": ds.checked}
    print(f"store {store.path}: {len(store)} rows; Trainer: {summary['trainer_steps']} steps, loss "
          f"{summary['trainer_loss']:.3f}; accelerate: {len(losses)} steps, loss {summary['accelerate_loss']:.3f} "
          f"(kept in {out})")
    return summary


if __name__ == "__main__":
    main()
