"""transformers.Trainer and accelerate on a CachedDataset (tiny models, seconds)."""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import pytest
import torch
from torch import nn

import actstore

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "trainer_head.py")


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("trainer_head", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trainer_and_accelerate_script(tmp_path: Any) -> None:
    summary = _script().main(["--out", str(tmp_path), "--items", "48", "--epochs", "1"])
    assert summary["rows"] == 48 and summary["checked"] == 48
    assert summary["trainer_steps"] == 3 and summary["accelerate_steps"] == 3
    assert math.isfinite(summary["trainer_loss"]) and math.isfinite(summary["accelerate_loss"])


class PooledHead(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(pooled.float())
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_trainer_with_its_default_collator_on_a_fixed_field(tmp_path: Any) -> None:
    from transformers import Trainer, TrainingArguments

    mod = _script()
    model = mod.tiny_classifier()
    data = mod.items(32)
    store = actstore.precompute(model, data, tmp_path / "s", layers="bert.pooler", progress=False)
    ds = actstore.CachedDataset(data, store, input_name="pooled")
    head = PooledHead(nn.Linear(32, 3))
    before = [p.detach().clone() for p in head.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, num_train_epochs=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    result = Trainer(model=head, args=args, train_dataset=ds).train()  # data_collator: Trainer's default
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))  # it trained
