"""The models layer's structure: the family registry, the parts' attribute pass-through, deprecated names."""

from __future__ import annotations

import ast
import copy
import importlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import actstore.models.split as split_module
from actstore.models.blocks import Frozen, Head
from actstore.models.families import FAMILIES, BlockFamily, ModelFamily, SplitPlan
from actstore.models.layout import BlockLayout
from actstore.models.split import plan_split, split_points
from actstore.models.split import split as _split
from actstore.testing.models import bert_batch, tiny_bert, tiny_mlp, tiny_resnet


def split(model: Any, at: Any) -> tuple[Any, Any]:
    """``split`` typed loosely: the parts' classes depend on the family."""
    return _split(model, at)


MODELS = Path(__file__).resolve().parent.parent / "actstore" / "models"


# -- the registry -------------------------------------------------------------------


def test_every_registered_family_is_a_model_family_and_plans_its_models() -> None:
    assert all(isinstance(f, ModelFamily) and f.description for f in FAMILIES)
    for model, name in ((tiny_mlp(), "sequential"), (tiny_resnet(), "resnet"), (tiny_bert(), "bert")):
        plan = plan_split(model)
        assert plan.family == name and plan.kind in FAMILIES and plan.kind.detect(model)
        assert plan.points == split_points(model)


class _Stack(nn.Module):
    """A model no built-in family knows: an embedding, a list of blocks, a norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(3, 8)
        self.stack = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.final = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.stack:
            h = block(h)
        return self.final(h)


class _StackFamily(BlockFamily):
    """What a new family module holds: detection and a layout; the mechanism is shared."""

    description = "stacks"

    def detect(self, model: Any) -> bool:
        return isinstance(model, _Stack)

    def plan(self, model: Any) -> SplitPlan:
        layout = BlockLayout("stack", "stack", "stem", ("stem",), None, tail=("final",), checked=True)
        return self.block_plan(layout, model)


def test_a_new_family_is_one_subclass_in_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Stack().eval()
    with pytest.raises(TypeError, match="Supported families"):
        split_points(model)
    monkeypatch.setattr(split_module, "FAMILIES", (_StackFamily(), *FAMILIES))
    assert split_points(model) == ["stem", "stack.0", "stack.1", "stack.2"]
    frozen, head = split(model, "stack.1")
    x = torch.randn(4, 3)
    torch.testing.assert_close(head(frozen(x)), model(x), rtol=0, atol=0)
    assert list(head.tail) == ["final"] and list(frozen.layer) == ["0", "1"]


def test_one_stop_forward_exception_in_the_models_layer() -> None:
    stops = []
    for path in sorted(MODELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id == "BaseException" for b in node.bases):
                stops.append(f"{path.relative_to(MODELS)}:{node.name}")
    assert stops == ["capture.py:StopForward"]


def test_models_import_no_private_name_of_another_module_and_stay_small() -> None:
    bad = []
    for path in sorted(MODELS.rglob("*.py")):
        lines = path.read_text()
        assert len(lines.splitlines()) <= 500, f"{path.relative_to(MODELS)}: over 500 lines"
        for node in ast.walk(ast.parse(lines)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("actstore"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


# -- Frozen / Head pass attribute access through to the model ----------------------------


def test_parts_read_the_models_attributes() -> None:
    model = tiny_bert().eval()
    model.custom_flag = "mine"  # type: ignore[assignment]
    frozen, head = split(model, "encoder.layer.1")
    for part in (frozen, head):
        assert part.config is model.config
        assert part.device == model.device and part.dtype == model.dtype == torch.float32
        assert part.main_input_name == "input_ids"
        assert part.custom_flag == "mine"
        assert part.get_input_embeddings() is model.embeddings.word_embeddings
        with pytest.raises(AttributeError, match="no_such_attribute"):
            _ = part.no_such_attribute
    assert frozen.at == head.at == "encoder.layer.1"  # the parts' own attributes come first
    assert isinstance(head.layer, nn.ModuleDict) and set(head.layer) == {"2", "3"}


def test_pass_through_leaves_parameters_and_state_dict_the_parts_own() -> None:
    model = tiny_bert().eval()
    frozen, head = split(model, "encoder.layer.1")
    head_keys = set(head.state_dict())
    assert head_keys == {
        *(f"layer.{i}.{n}" for i in (2, 3) for n in model.encoder.layer[i].state_dict()),
        *(f"tail.pooler.{n}" for n in model.pooler.state_dict()),
    }
    assert {id(p) for p in head.parameters()} == {
        id(p) for m in (model.encoder.layer[2], model.encoder.layer[3], model.pooler) for p in m.parameters()}
    assert {id(p) for p in frozen.parameters()} | {id(p) for p in head.parameters()} == {
        id(p) for p in model.parameters()}
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in head.parameters()}
    assert "base" not in dict(head.named_children()) and "base" not in dict(frozen.named_children())
    batch = bert_batch([5, 3])
    torch.testing.assert_close(head(frozen(**batch)).last_hidden_state, model(**batch).last_hidden_state,
                               rtol=0, atol=0)


def test_dunder_names_and_copies_stay_with_the_part() -> None:
    model = tiny_bert().eval()
    model.__custom__ = 1  # type: ignore[attr-defined]
    frozen, head = split(model, "encoder.layer.1")
    assert not hasattr(head, "__custom__")
    clone = copy.deepcopy(head)
    assert type(clone) is Head and set(clone.state_dict()) == set(head.state_dict())
    again = pickle.loads(pickle.dumps(frozen))
    assert type(again) is Frozen and again.config.hidden_size == model.config.hidden_size


# -- deprecated names ---------------------------------------------------------------


@pytest.mark.parametrize(("module", "old", "new"), [
    ("actstore.models.split", "BertFrozen", Frozen),
    ("actstore.models.split", "BertHead", Head),
    ("actstore.models.families", "Family", BlockLayout),
])
def test_legacy_aliases_warn_and_name_the_replacement(module: str, old: str, new: type) -> None:
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use .*{new.__name__}"):
        assert getattr(mod, old) is new
    with pytest.warns(DeprecationWarning, match=old):
        exec(f"from {module} import {old}", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mod.__name__ == module  # other names do not warn
    with pytest.raises(AttributeError):
        _ = mod.NoSuchName
