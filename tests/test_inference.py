"""Inference from the store (actstore.infer): outputs equal the full model's; bad input refused clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import actstore
from actstore.cli import main as cli_main
from tests.precompute_helpers import pad_collate as _collate

pytest.importorskip("transformers")


def _llama() -> Any:
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def _data(n: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 100, (int(k),), generator=gen).tolist() for k in torch.randint(3, 12, (n,), generator=gen)]


class MeanPool(nn.Module):
    """A task head: the split head, then the mean over the real tokens."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.head(states, mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)


def _full(model: Any, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        rows = [model(**_collate([s])).last_hidden_state[0] for s in seqs]
    return torch.stack([r.mean(0) for r in rows])


@pytest.fixture()
def setup(tmp_path: Any) -> Any:
    model = _llama()
    frozen, head = actstore.split(model, 0.5)
    data = _data()
    store = actstore.precompute(model, data, tmp_path / "s", layers=frozen.at, collate_fn=_collate, progress=False,
                                store_dtype="float32")
    return model, frozen, head, data, store


def test_infer_every_row_equals_the_full_model(setup: Any) -> None:
    model, frozen, head, data, store = setup
    got = actstore.infer(MeanPool(head), store, frozen=frozen, batch_size=7, progress=False)
    assert isinstance(got, torch.Tensor) and got.shape == (len(store), 32)
    rows = store.view("dataset")  # dataset position -> store row
    want = _full(model, data)
    torch.testing.assert_close(got[torch.as_tensor(rows)], want, atol=1e-5, rtol=1e-5)


def test_infer_given_keys_and_rows_and_workers(setup: Any) -> None:
    model, frozen, head, data, store = setup
    task = MeanPool(head)
    every = actstore.infer(task, store, frozen=frozen, progress=False)
    pick = [5, 0, 17, 3]
    by_rows = actstore.infer(task, store, frozen=frozen, rows=pick, progress=False)
    by_keys = actstore.infer(task, store, frozen=frozen, keys=store.key_at(pick), progress=False)
    torch.testing.assert_close(by_rows, every[pick])
    torch.testing.assert_close(by_keys, every[pick])
    workers = actstore.infer(task, store, frozen=frozen, batch_size=8, num_workers=2, progress=False)
    torch.testing.assert_close(workers, every)
    assert task.training  # the head's mode is restored


def test_infer_token_level_trims_to_the_real_tokens(setup: Any) -> None:
    model, frozen, head, data, store = setup
    got = actstore.infer(head, store, frozen=frozen, output=lambda o: o.last_hidden_state, token_level=True,
                         progress=False)
    assert isinstance(got, list) and len(got) == len(store)
    row = int(store.view("dataset")[4])
    with torch.no_grad():
        want = model(**_collate([data[4]])).last_hidden_state[0]
    torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_infer_writes_a_new_store_under_the_same_keys(setup: Any, tmp_path: Any) -> None:
    model, frozen, head, data, store = setup
    task = MeanPool(head)
    out = actstore.infer(task, store, frozen=frozen, out=tmp_path / "emb", out_field="embedding", progress=False)
    assert isinstance(out, actstore.ActivationStore)
    assert len(out) == len(store) and set(out.fields) == {"embedding"}
    every = actstore.infer(task, store, frozen=frozen, progress=False)
    key = store.key_at([9])[0].tobytes()
    torch.testing.assert_close(out.get(key)["embedding"], every[9])
    assert out.attrs["inference"]["input_field"] == next(iter(n for n in store.fields if not n.startswith("item_")))


def test_infer_refuses_a_store_of_another_frozen_part(setup: Any) -> None:
    model, frozen, head, data, store = setup
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.add_(0.01)  # a frozen weight changed: the store is stale
    with pytest.raises(actstore.StaleStoreError, match="check_fingerprint=False"):
        actstore.infer(MeanPool(head), store, frozen=frozen, progress=False)
    with pytest.raises(TypeError, match="frozen="):
        actstore.infer(MeanPool(head), store, progress=False)
    got = actstore.infer(MeanPool(head), store, check_fingerprint=False, progress=False)
    assert got.shape[0] == len(store)


def test_infer_training_the_head_keeps_the_store_fresh(setup: Any) -> None:
    model, frozen, head, data, store = setup
    with torch.no_grad():
        model.layers[3].mlp.up_proj.weight.add_(0.01)  # a head weight: the store stays valid
    got = actstore.infer(MeanPool(head), store, frozen=frozen, progress=False)
    torch.testing.assert_close(got[torch.as_tensor(store.view("dataset"))], _full(model, data), atol=1e-5, rtol=1e-5)


def test_infer_unknown_field_lists_the_fields(setup: Any) -> None:
    model, frozen, head, data, store = setup
    with pytest.raises(KeyError) as err:
        actstore.infer(MeanPool(head), store, "hidden", frozen=frozen, progress=False)
    for name in store.fields:
        assert name in str(err.value)
    with pytest.raises(KeyError, match="not in the store"):
        actstore.infer(MeanPool(head), store, frozen=frozen, keys=[b"\0" * 32], progress=False)


def test_infer_command(setup: Any, tmp_path: Any) -> None:
    model, frozen, head, data, store = setup
    factory = tmp_path / "heads.py"
    here = str(Path(__file__).parent)
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {here!r})\n"
        "from test_inference import MeanPool, _llama\n"
        "import actstore\n"
        "def task():\n"
        "    frozen, head = actstore.split(_llama(), 0.5)\n"
        "    return MeanPool(head), frozen\n")
    rc = cli_main(["infer", "--head", f"{factory}:task", "--store", str(store.path), "--out", str(tmp_path / "o"),
                   "-q"])
    assert rc == 0
    out = actstore.open(tmp_path / "o")
    expect = actstore.infer(MeanPool(head), store, frozen=frozen, progress=False)
    torch.testing.assert_close(out.get(store.key_at([2])[0].tobytes())["output"], expect[2])


def test_infer_runs_a_text_head_over_a_fixed_field_stored_without_padding(tmp_path: Any) -> None:
    """Token states stored without a mask (equal lengths) are a fixed field: the head runs them unpadded."""
    from tests.family_models import VOCAB_SIZE, tiny

    model = tiny("bert")
    frozen, head = actstore.split(model, 0.5)
    ids = torch.randint(2, VOCAB_SIZE, (4, 6), generator=torch.Generator().manual_seed(0))
    items = [row for row in ids]
    store = actstore.precompute(frozen, items, tmp_path / "s", progress=False,
                                collate_fn=lambda rows: {"input_ids": torch.stack(rows)})
    assert not next(iter(store.fields.values())).ragged
    got = actstore.infer(head, store, frozen=frozen, progress=False, output=lambda o: o.last_hidden_state)
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
