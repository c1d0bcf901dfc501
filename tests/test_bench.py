"""Tests for ``actstore bench``: the measurement on tiny models, the command, out-of-memory handling, errors."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import pytest
import torch
from torch import nn

from actstore.cli import main as cli_main
from actstore.cli.bench import BenchError, BenchReport, _parse_depths, default_loss, is_oom, run_bench
from actstore.testing.models import VOCAB, tiny_mlp, tiny_resnet, tiny_sentence_transformer

HERE = os.path.abspath(__file__)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- factories, also used through the command line (tests/test_bench.py:NAME) ---------------


def resnet_factory() -> nn.Module:
    return tiny_resnet()


def image_data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 32, 32, generator=gen) for _ in range(8)]


def vector_data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, generator=gen) for _ in range(8)]


def not_splittable() -> nn.Module:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    return Custom()


def broken_factory() -> nn.Module:
    raise RuntimeError("no weights here")


class OOMAbove(nn.Module):
    """Raises an out-of-memory error for batches larger than ``limit`` (simulates a model too big to train)."""

    def __init__(self, limit: int, message: str | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.message = message
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            if self.message is not None:
                raise RuntimeError(self.message)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return self.lin(x)


def oom_model(limit: int = 2, message: str | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), OOMAbove(limit, message))


def oom_factory() -> nn.Sequential:
    return oom_model(limit=0)


def quick(model: nn.Module, data: list[Any], **kw: Any) -> BenchReport:
    kw.setdefault("batch_size", 4)
    return run_bench(model, data, steps=1, rounds=1, progress=False, log=lambda m: None, **kw)


def check_report(report: BenchReport, labels: list[str]) -> None:
    assert [r.name for r in report.rows] == ["full fine-tuning", *labels]
    full = report.rows[0]
    assert full.epoch_seconds is not None and full.epoch_seconds > 0
    for row in report.rows[1:]:
        assert row.precompute_seconds is not None and row.precompute_seconds > 0
        assert row.disk_bytes is not None and row.disk_bytes > 0
        if row.trainable_params:
            assert row.epoch_seconds is not None and row.epoch_seconds > 0
            assert row.recompute_epoch_seconds is not None and row.recompute_epoch_seconds > 0
            assert row.speedup_vs_full is not None and row.speedup_vs_full > 0
            assert row.breakeven_vs_recompute is not None and row.breakeven_vs_recompute >= 0
    md = report.markdown()
    assert md.count("\n|") == len(report.rows) + 2  # header, rule, rows
    json.dumps(report.to_json(), default=str)


# -- measurement ------------------------------------------------------------------------------


def test_resnet_all_depths() -> None:
    report = quick(tiny_resnet(), image_data())
    check_report(report, ["0%", "25%", "50%", "75%", "100%"])
    assert [r.split_point for r in report.rows[1:]] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert [r.frozen_blocks for r in report.rows[1:]] == [0, 1, 2, 3, 4]
    # deeper recycling trains fewer parameters and stores smaller activations (after the stem)
    params = [r.trainable_params for r in report.rows]
    assert params == sorted(params, reverse=True)
    assert report.rows[-1].disk_bytes < report.rows[2].disk_bytes  # type: ignore[operator]
    assert report.samples == 8 and report.steps_per_epoch == 2


def test_sequential_has_no_stem_and_keeps_a_trainable_head() -> None:
    report = quick(tiny_mlp(), vector_data())
    labels = [r.name for r in report.rows[1:]]
    assert "0%" not in labels and labels[-1] == "100%"
    assert report.rows[-1].trainable_params > 0  # the last Linear stays trainable


def test_sentence_transformer_ragged_store_and_param_free_head(tmp_path: Any) -> None:
    from actstore.examples.faq import Tokenize

    model = tiny_sentence_transformer(tmp_path / "st")
    words = VOCAB[5:]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(8)]
    report = quick(model, texts, collate_fn=Tokenize(model), depths=[0.5, 1.0])
    check_report(report, ["50%", "100%"])
    all_frozen = report.rows[-1]
    assert all_frozen.trainable_params == 0 and "nothing left to train" in all_frozen.note
    assert "| head only |" not in report.markdown()  # the main job's name for a trained head; not this row
    assert all_frozen.epoch_seconds is None


def test_named_split_points_and_dedup() -> None:
    report = quick(tiny_resnet(), image_data(), depths=["layer2", 0.5, 1.0])
    assert [r.split_point for r in report.rows[1:]] == ["layer2", "layer4"]


def test_bad_split_points() -> None:
    with pytest.raises(ValueError, match="layer1"):  # lists the candidates
        quick(tiny_resnet(), image_data(), depths=["layer9"])
    with pytest.raises(ValueError, match="inside block"):
        quick(tiny_resnet(), image_data(), depths=["layer2.0"])
    with pytest.raises(BenchError, match="lie in"):
        quick(tiny_resnet(), image_data(), depths=[1.5])
    with pytest.raises(TypeError, match="does not know how to split"):
        quick(not_splittable(), vector_data())


def test_default_loss_is_fixed_and_differentiable() -> None:
    y = torch.randn(4, 5, 7, requires_grad=True)
    a, b = default_loss()(y), default_loss()(y)
    assert torch.equal(a, b) and a.ndim == 0
    a.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(BenchError, match="floating"):
        default_loss()(torch.ones(3, dtype=torch.long))


def test_custom_loss_is_used() -> None:
    calls: list[int] = []

    def loss(out: torch.Tensor) -> torch.Tensor:
        calls.append(out.shape[0])
        return out.sum()

    quick(tiny_mlp(), vector_data(), loss_fn=loss, depths=[0.5])
    assert calls and set(calls) == {4}


# -- out of memory ------------------------------------------------------------------------


def test_is_oom() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


@pytest.mark.parametrize("message", [None, "CUDA error: out of memory"])
def test_oom_lowers_the_batch_size_and_says_so(message: str | None) -> None:
    logged: list[str] = []
    report = run_bench(oom_model(limit=2, message=message), vector_data(), batch_size=8, steps=1, rounds=1,
                       progress=False, log=logged.append, depths=[0.5])
    assert report.batch_size == 2
    said = [m for m in logged if "out of memory" in m]
    assert len(said) == 2 and "batch size 8" in said[0] and "to 4" in said[0] and "to 2" in said[1]


def test_oom_at_the_smallest_batch_size_stops_clearly() -> None:
    with pytest.raises(BenchError, match=r"out of memory .* at batch size 2, the smallest allowed"):
        run_bench(oom_model(limit=1), vector_data(), batch_size=8, min_batch_size=2, steps=1, rounds=1,
                  progress=False, log=lambda m: None)


def test_other_errors_are_not_retried() -> None:
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_bench(oom_model(limit=0, message="shape mismatch"), vector_data(), batch_size=8, steps=1, rounds=1,
                  progress=False, log=logged.append)
    assert not [m for m in logged if "out of memory" in m]


# -- the command ----------------------------------------------------------------------------


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["bench", "--steps", "1", "--rounds", "1", "--batch-size", "4", "-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_writes_table_json_and_plot(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = str(tmp_path / "out" / "cnn")
    code, out, err = bench(capsys, "--model", f"{HERE}:resnet_factory", "--data", f"{HERE}:image_data",
                           "--depths", "0,50%,100", "--out", prefix)
    assert code == 0, err
    assert "| full fine-tuning |" in out and "| 50% | layer2 |" in out and "| 100% | layer4 |" in out
    with open(prefix + ".json") as f:
        data = json.load(f)
    assert [r["name"] for r in data["rows"]] == ["full fine-tuning", "0%", "50%", "100%"]
    assert os.path.getsize(prefix + ".png") > 1000
    with open(prefix + ".md") as f:
        assert f.read().startswith("### actstore bench")


def test_cli_without_matplotlib_fails_only_for_the_plot(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    prefix = str(tmp_path / "mlp")
    code, out, err = bench(capsys, "--model", f"{HERE}:tiny_mlp", "--data", f"{HERE}:vector_data",
                           "--depths", "50", "--out", prefix)
    assert code == 1
    assert "matplotlib" in err and "table was written" in err
    assert os.path.exists(prefix + ".md") and os.path.exists(prefix + ".json")
    assert not os.path.exists(prefix + ".png")
    code, _, _ = bench(capsys, "--model", f"{HERE}:tiny_mlp", "--data", f"{HERE}:vector_data",
                       "--depths", "50", "--out", prefix, "--no-plot")
    assert code == 0


def test_cli_bad_split_point_lists_candidates(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--model", f"{HERE}:resnet_factory", "--data", f"{HERE}:image_data",
                         "--depths", "layer7")
    assert code == 1
    assert err.startswith("actstore bench: error:") and "maxpool" in err and "layer3" in err


def test_cli_split_inside_a_block(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--model", f"{HERE}:resnet_factory", "--data", f"{HERE}:image_data",
                         "--depths", "layer3.1.conv1")
    assert code == 1 and "inside block 'layer3'" in err


def test_cli_unsupported_model_and_bad_factories(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--model", f"{HERE}:not_splittable", "--data", f"{HERE}:vector_data")
    assert code == 1 and "does not know how to split" in err
    code, _, err = bench(capsys, "--model", f"{HERE}:broken_factory", "--data", f"{HERE}:vector_data")
    assert code == 2 and "no weights here" in err
    code, _, err = bench(capsys, "--model", "no_such_module_xyz:f", "--data", f"{HERE}:vector_data")
    assert code == 2 and "cannot import" in err


def test_cli_oom_at_batch_size_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--model", f"{HERE}:oom_factory", "--data", f"{HERE}:vector_data")
    assert code == 1
    assert "out of memory" in err and "batch size 1" in err and "lowering the batch size to 2" in err


def test_parse_depths() -> None:
    assert _parse_depths("0,25,50%,0.75,head,layer3") == [0.0, 0.25, 0.5, 0.75, 1.0, "layer3"]
    assert _parse_depths("1") == [1.0] and _parse_depths("100") == [1.0] and _parse_depths("all") == [1.0]
    assert math.isclose(_parse_depths("1%")[0], 0.01)  # type: ignore[arg-type]


def test_module_is_light_at_import() -> None:
    """bench/demo/experiment add no heavy import to the package's own (the command line imports bench)."""
    import subprocess

    code = ("import sys, actstore; before = set(sys.modules); "
            "import actstore.cli.bench, actstore.examples.demo, actstore.examples.experiment, actstore.examples.faq; "
            "heavy = ('transformers', 'sentence_transformers', 'matplotlib', 'tqdm', 'torchvision'); "
            "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(HERE)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
