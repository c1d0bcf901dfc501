"""``actstore.recycle`` against its peers: steady-state steps and the first epoch (issue 22, "Speed").

``python -m benchmarks.bench_recycle [--rounds 5] [--batches 8] [--batch-size 16] [--models minilm,bert,llama]``

Per model (all-MiniLM-L6-v2 as a SentenceTransformer; a BERT classifier and a
small Llama causal LM built from configs), split at 0.5:

1. **steady state**: a training step (forward, loss, backward, AdamW step,
   data loading included) of the recycled model with every sample stored (all
   hits) ÷ the head-only step from ``CachedDataset`` on the same batches (the
   store ``precompute`` filled, ``split``'s head, the same loss).  Target ≤ 1.05.
2. **first epoch**: an epoch of the recycled model on an empty store (all
   misses, appending, committed at ``close()``) ÷ an epoch of the same model
   with the same blocks frozen (``requires_grad=False``) and computed on the
   fly, no store.  Target ≤ 1.10.

Rounds are interleaved (the order alternates per round) so the machine's load
hits both alike; a ratio is the median over the rounds of each round's paired
ratio, of the process's CPU time (what the step costs; with one torch thread
it is barely touched by other processes' load) and of wall time (what a user
waits; on a loaded machine mostly the load), printed with the load average.  Dropout is 0 in the models built from configs and MiniLM's is
set to 0, so both sides compute the same.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import actstore
from benchmarks.common import Table, machine

VOCAB = 1000
FAQ = os.environ.get("ACTSTORE_FAQ_DATA", "/work/shared/data/cloud_faq_dataset.jsonl")


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def pad_inputs(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token lists -> right-padded ``input_ids``, ``attention_mask`` (precompute's and CachedDataset's collate)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_collate(items: list[tuple[list[int], Any]]) -> dict[str, torch.Tensor]:
    """(token list, label) items -> ``pad_inputs`` and the stacked ``labels`` (the training loader's collate)."""
    return {**pad_inputs([s for s, _ in items]), "labels": torch.stack([torch.as_tensor(y) for _, y in items])}


def token_items(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 64, (n,), generator=gen).tolist()
    return [(torch.randint(5, VOCAB, (k,), generator=gen).tolist(), i % 3) for i, k in enumerate(lengths)]


class Case:
    """One model: how to build it, its items, its collate, the recycled loss and the head-only loss."""

    name: str
    at: str

    def model(self) -> nn.Module:
        raise NotImplementedError

    def items(self, n: int) -> list[Any]:
        return token_items(n)

    def collate(self, model: nn.Module) -> Callable[[list[Any]], Any]:
        return pad_collate

    def inputs_collate(self, model: nn.Module) -> Callable[[list[Any]], Any]:
        return pad_inputs

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(**batch).loss  # type: ignore[no-any-return]

    def head(self, model: nn.Module) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        raise NotImplementedError

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError


class Bert(Case):
    name, at = "BERT classifier (6x384)", "bert.encoder.layer.2"

    def model(self) -> nn.Module:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                            intermediate_size=1536, max_position_embeddings=128, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(cfg)

    def head(self, model: Any) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        _, head = actstore.split(model.bert, "encoder.layer.2")

        def loss(batch: Any) -> torch.Tensor:
            states, labels = batch
            pooled = head(states).pooler_output
            return F.cross_entropy(model.classifier(model.dropout(pooled)), labels)

        return head, loss

    def frozen_modules(self, model: Any) -> list[nn.Module]:
        return [model.bert.embeddings, *model.bert.encoder.layer[:3]]


class Llama(Case):
    name, at = "Llama causal LM (4x256)", "model.layers.1"

    def model(self) -> nn.Module:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return tf.LlamaForCausalLM(cfg)

    def collate(self, model: nn.Module) -> Callable[[list[Any]], Any]:
        def lm(items: list[Any]) -> dict[str, torch.Tensor]:
            batch = pad_collate(items)
            batch["labels"] = batch["labels"][:, :batch["input_ids"].shape[1]]
            return batch

        return lm

    def head(self, model: Any) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        _, head = actstore.split(model.model, "layers.1")

        def loss(batch: Any) -> torch.Tensor:
            states, labels = batch
            logits = model.lm_head(head(states).last_hidden_state)
            labels = labels[:, :logits.shape[1]]
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)

        return head, loss

    def items(self, n: int) -> list[Any]:
        out = []
        for s, _ in token_items(n):  # a causal LM item's labels: its own tokens, -100 beyond them
            labels = torch.full((64,), -100, dtype=torch.long)
            labels[:len(s)] = torch.tensor(s)
            out.append((s, labels))
        return out

    def frozen_modules(self, model: Any) -> list[nn.Module]:
        return [model.model.embed_tokens, *model.model.layers[:2]]


class MiniLM(Case):
    name, at = "all-MiniLM-L6-v2 (SentenceTransformer)", "0.5"

    def model(self) -> nn.Module:
        from actstore.examples.faq.model import load_minilm
        from actstore.examples.recycle.data import no_dropout

        return no_dropout(load_minilm())  # type: ignore[no-any-return]

    def items(self, n: int) -> list[Any]:
        from actstore.examples.faq.data import read_pairs, stdlib_pairs

        pairs = read_pairs(FAQ) if os.path.exists(FAQ) else stdlib_pairs()
        return list(dict.fromkeys(pairs.questions))[:n]  # distinct texts: epoch 1 is all misses

    def collate(self, model: nn.Module) -> Callable[[list[Any]], Any]:
        from actstore.examples.faq.model import Tokenize

        return Tokenize(model)

    def inputs_collate(self, model: nn.Module) -> Callable[[list[Any]], Any]:
        return self.collate(model)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch)["sentence_embedding"].pow(2).mean()  # type: ignore[no-any-return]

    def head(self, model: nn.Module) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        _, head = actstore.split(model, 0.5)
        return head, lambda states: head(states).pow(2).mean()

    def frozen_modules(self, model: Any) -> list[nn.Module]:
        bert = model[0].auto_model
        return [bert.embeddings, *bert.encoder.layer[:3]]


CASES = {"minilm": MiniLM, "bert": Bert, "llama": Llama}


def _at(case: Case, model: nn.Module) -> Any:
    return 0.5 if case.at == "0.5" else case.at


def batches_of(n: int, batch_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def loader(dataset: Any, batches: list[list[int]], collate: Callable[[list[Any]], Any] | None) -> Iterator[Any]:
    kw: dict[str, Any] = {"batch_sampler": batches}
    if collate is not None:
        kw["collate_fn"] = collate
    return iter(torch.utils.data.DataLoader(dataset, **kw))


def epoch(step_loss: Callable[[Any], torch.Tensor], batches: Iterator[Any], opt: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step of one epoch, data loading included."""
    w0, c0, n = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        opt.zero_grad()
        step_loss(batch).backward()
        opt.step()
        n += 1
    return (time.perf_counter() - w0) / max(n, 1), (time.process_time() - c0) / max(n, 1)


def summary(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[str, str, str]:
    """(per-step times, median of the rounds' paired CPU ratios, median of the paired wall ratios)."""
    cpu = statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True))
    wall = statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True))
    ms = (f"CPU {statistics.median(x[1] for x in a) * 1e3:.0f} / {statistics.median(y[1] for y in b) * 1e3:.0f}; "
          f"wall {statistics.median(x[0] for x in a) * 1e3:.0f} / {statistics.median(y[0] for y in b) * 1e3:.0f}")
    return ms, f"{cpu:.3f}", f"{wall:.3f}"


def bench_case(case: Case, rounds: int, n_batches: int, batch_size: int, tmp: str, table: Table) -> None:
    model = case.model()
    model.train()
    items = case.items(n_batches * batch_size)
    collate = case.collate(model)
    batches = batches_of(len(items), batch_size)
    at = _at(case, model)
    store = os.path.join(tmp, f"{type(case).__name__}-pre.store")
    frozen_at = actstore.split(model, at)[0].at if isinstance(at, float) else at  # type: ignore[attr-defined]
    actstore.precompute(model, items, store, layers=frozen_at, collate_fn=case.inputs_collate(model), store_dtype="float32",
                        progress=False)
    ds = actstore.CachedDataset(items, store, collate_fn=case.inputs_collate(model))
    twin = copy.deepcopy(model)  # split's head shares its modules: a twin keeps it off the recycled forward
    head, head_loss = case.head(twin)
    head_opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-5)
    frozen_ids = {id(p) for m in case.frozen_modules(model) for p in m.parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in frozen_ids], lr=1e-5)

    # 1. steady state: recycled (all hits) vs head-only from CachedDataset
    steady: dict[str, list[tuple[float, float]]] = {"recycled": [], "cached": []}
    actstore.recycle(model, at, store)
    epoch(lambda b: case.loss(model, b), loader(items, batches, collate), opt)  # warm-up
    epoch(head_loss, loader(ds, batches, None), head_opt)
    if model.recycle_stats["misses"]:  # type: ignore[operator]
        raise RuntimeError(f"bench_recycle: the precomputed store does not serve every batch: {model.recycle_stats}")
    for r in range(rounds):
        order = ["recycled", "cached"] if r % 2 == 0 else ["cached", "recycled"]
        for side in order:
            if side == "recycled":
                steady[side].append(epoch(lambda b: case.loss(model, b), loader(items, batches, collate), opt))
            else:
                steady[side].append(epoch(head_loss, loader(ds, batches, None), head_opt))
    stats = dict(model.recycle_stats)  # type: ignore[operator]
    model.close()  # type: ignore[operator]
    if stats["misses"]:
        raise RuntimeError(f"bench_recycle: the steady rounds computed misses: {stats}")
    table.add(case.name, "steady step: recycled (all hits) / head-only from CachedDataset",
              *summary(steady["recycled"], steady["cached"]), "≤ 1.05", load())

    # 2. first epoch: recycled on an empty store (all misses, appending, commit) vs frozen on the fly
    first: dict[str, list[tuple[float, float]]] = {"recycled": [], "on the fly": []}
    for r in range(rounds):
        order = ["recycled", "on the fly"] if r % 2 == 0 else ["on the fly", "recycled"]
        for side in order:
            if side == "recycled":
                path = os.path.join(tmp, f"{type(case).__name__}-first-{r}.store")
                w0, c0 = time.perf_counter(), time.process_time()
                actstore.recycle(model, at, path)
                epoch(lambda b: case.loss(model, b), loader(items, batches, collate), opt)
                model.close()  # type: ignore[operator]  (commits: part of the epoch's cost)
                first[side].append(((time.perf_counter() - w0) / len(batches),
                                    (time.process_time() - c0) / len(batches)))
                shutil.rmtree(path, ignore_errors=True)
            else:
                for m in case.frozen_modules(model):
                    m.requires_grad_(False)
                first[side].append(epoch(lambda b: case.loss(model, b), loader(items, batches, collate), opt))
                for m in case.frozen_modules(model):
                    m.requires_grad_(True)
    table.add(case.name, "first epoch: recycled (all misses, appending, commit) / frozen blocks on the fly",
              *summary(first["recycled"], first["on the fly"]), "≤ 1.10", load())
    for side, ts in {**{f"steady {k}": v for k, v in steady.items()},
                     **{f"first {k}": v for k, v in first.items()}}.items():
        print(f"  {case.name} {side} (wall/CPU ms per step): " + " ".join(f"{w * 1e3:.0f}/{c * 1e3:.0f}" for w, c in ts),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=8, help="batches per epoch")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--models", default="minilm,bert,llama")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine(), "|", load(), "| torch threads", torch.get_num_threads(), flush=True)
    table = Table(f"recycle vs its peers: medians of {args.rounds} interleaved rounds, {args.batches} batches of "
                  f"{args.batch_size}", ["model", "ratio of", "ms per step (medians)", "ratio, CPU time", "ratio, wall time", "target",
                   "load (1, 5, 15 min)"])
    tmp = tempfile.mkdtemp(prefix="bench-recycle-")
    try:
        for name in args.models.split(","):
            bench_case(CASES[name](), args.rounds, args.batches, args.batch_size, tmp, table)
            table.print()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
