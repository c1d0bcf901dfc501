"""``transformers.Trainer`` from the store against ``Trainer`` over the same tensors in RAM, and CachedDataset's key check.

Two questions a Hugging Face user asks before swapping a ``CachedDataset`` into a ``Trainer``:

1. **Does the store slow the epoch down?** A head-only epoch (the upper blocks of a small BERT classifier, trained
   from the states of its block 1) runs through ``Trainer`` twice per round, in alternating order: once over a
   ``CachedDataset`` (items ``{"hidden_states", "labels"}`` read from the store's memory maps, padded by
   ``actstore.ActivationCollate(names={})``) and once over a plain list of the same items already in RAM as tensors,
   padded by a collate that does the same work in plain torch. Target: store ÷ RAM ≤ 1.10 (median of the rounds).
2. **What does the construction-time key check cost?** ``CachedDataset`` keys every cheap input when it is built
   (``check="auto"``). Over the FAQ texts (16,996 questions and answers when the data file is there; pairs from the
   standard library's docstrings otherwise) that is timed beside one epoch of a head trained from the store.

Run::

    python benchmarks/bench_trainer.py [--data ../shared/data/cloud_faq_dataset.jsonl] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `actstore` and `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actstore  # noqa: E402
from benchmarks.common import Table, machine  # noqa: E402

FAQ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cloud_faq_dataset.jsonl")


def classifier(hidden: int = 128, layers: int = 4) -> Any:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=4 * hidden, num_labels=4)
    return transformers.BertForSequenceClassification(config).eval()


def items(n: int, max_length: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, max_length + 1, (1,), generator=gen))
        ids = torch.zeros(max_length, dtype=torch.int64)
        ids[:length] = torch.randint(5, 1000, (length,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": (torch.arange(max_length) < length).long(),
                    "labels": int(ids[0]) % 4})
    return out


class Head(torch.nn.Module):
    def __init__(self, model: Any, at: str) -> None:
        super().__init__()
        self.encoder = actstore.split(model.bert, at)[1]
        self.classifier = model.classifier

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.encoder(hidden_states.float(), attention_mask).pooler_output)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def ram_collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The same batch as ActivationCollate(names={}), from tensors in RAM: pad, mask, stack the labels."""
    width = max(len(b["hidden_states"]) for b in batch)
    states = torch.zeros(len(batch), width, batch[0]["hidden_states"].shape[-1], dtype=batch[0]["hidden_states"].dtype)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, b in enumerate(batch):
        n = len(b["hidden_states"])
        states[i, :n] = b["hidden_states"]
        mask[i, :n] = True
    return {"hidden_states": states, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}


def trainer_epoch(model: Any, dataset: Any, collate: Any, out: str) -> float:
    import transformers

    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=64, num_train_epochs=1,
                                          learning_rate=1e-4, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
    t = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t


def texts(path: str | None) -> list[str]:
    if path and os.path.exists(path):
        out = []
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                out += [d["question"], d["answer"]]
        return out
    from actstore.examples.faq.data import stdlib_pairs

    pairs = stdlib_pairs()
    return list(pairs.questions) + list(pairs.answers)


def key_check(data_path: str | None, work: str) -> dict[str, Any]:
    """CachedDataset construction (every text keyed) beside one epoch of an MLP head from the same store."""
    all_texts = texts(data_path)
    dim = 384
    rng = np.random.default_rng(0)
    # rows keyed by the raw texts (as precompute(key_fn=actstore.key) keys them)
    attrs = {"precompute": {"version": 2, "layers": [{"layer": "l", "field": "emb", "ragged": False}],
                            "sample": {"type": "bare"}, "dataset_length": len(all_texts), "keys": "items"}}
    path = os.path.join(work, "texts.store")
    keys = actstore.keys(all_texts)
    with actstore.create(path, {"emb": actstore.Field((dim,), "float16")}, attrs=attrs) as w:
        w.append(keys, {"emb": rng.standard_normal((len(all_texts), dim)).astype(np.float16)})
        w.commit()  # repeated texts are one row: the view maps each position to its key's row
        w.set_view("dataset", w.lookup(keys))
    t = time.perf_counter()
    ds = actstore.CachedDataset(all_texts, path)
    build = time.perf_counter() - t
    head = torch.nn.Sequential(torch.nn.Linear(dim, 1536), torch.nn.ReLU(), torch.nn.Linear(1536, dim))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True)
    t = time.perf_counter()
    for x in loader:
        loss = head(x.float()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    epoch = time.perf_counter() - t
    return {"texts": len(all_texts), "checked": ds.checked, "mode": ds.check_mode, "build_s": build, "epoch_s": epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default=FAQ if os.path.exists(FAQ) else None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", help="also write the Markdown tables here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    work = tempfile.mkdtemp(prefix="bench-trainer-")
    model = classifier()
    data = items(args.items)
    at = "encoder.layer.1"
    store = actstore.precompute(model, data, os.path.join(work, "store"), layers=f"bert.{at}", progress=False)
    ds = actstore.CachedDataset(data, store, input_name="hidden_states")
    ram = [{"hidden_states": it["hidden_states"].clone(), "labels": it["labels"]} for it in (ds[i] for i in range(len(ds)))]
    ours = actstore.ActivationCollate(names={})
    ratios, t_store, t_ram = [], [], []
    trainer_epoch(Head(classifier(), at).train(), ds, ours, os.path.join(work, "warm"))  # warm-up
    for r in range(args.rounds):
        runs = [("store", ds, ours), ("ram", ram, ram_collate)]
        if r % 2:
            runs.reverse()
        got = {}
        for name, dataset, collate in runs:
            got[name] = trainer_epoch(Head(classifier(), at).train(), dataset, collate, os.path.join(work, name))
        t_store.append(got["store"])
        t_ram.append(got["ram"])
        ratios.append(got["store"] / got["ram"])
    ratio = statistics.median(ratios)
    table = Table("Head-only Trainer epoch: store vs the same tensors in RAM (batch 64)", ["what", "items", "RAM epoch (s)", "store epoch (s)", "store ÷ RAM (range)", "target", "result"])
    table.add(*["Trainer epoch, BERT 4×128 classifier, blocks 2-3 + pooler + classifier from block 1's states",
               f"{args.items:,}", f"{statistics.median(t_ram):.3g}", f"{statistics.median(t_store):.3g}",
               f"{ratio:.3f} ({min(ratios):.3f}–{max(ratios):.3f})", "≤ 1.10", "PASS" if ratio <= 1.10 else "FAIL"])
    kc = key_check(args.data, work)
    table2 = Table("CachedDataset construction vs one epoch", ["what", "texts", "keys checked", "CachedDataset(...) s", "one MLP-head epoch from the store s",
                    "check ÷ epoch"])
    table2.add(*["construction-time key check (check='auto')", f"{kc['texts']:,}", f"{kc['checked']:,} ({kc['mode']})",
                f"{kc['build_s']:.3f}", f"{kc['epoch_s']:.3f}", f"{kc['build_s'] / kc['epoch_s']:.2f}"])
    lines = ["# Trainer from the store, and CachedDataset's key check", "",
             f"- machine: {machine()}; torch threads: {args.threads}; load average at the end "
             f"{os.getloadavg()[0]:.1f}",
             f"- command: `python benchmarks/bench_trainer.py{' --data ' + args.data if args.data else ''}`",
             f"- {args.rounds} rounds, the two epochs of a round in alternating order; median of per-round ratios", "",
             table.markdown(), "", table2.markdown(), ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
