"""The main job's summary (quality against full fine-tuning, speedups over rounds, the load note) and its runs.

Synthetic numbers only: nothing here loads a model or reads data.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from actstore.examples.faq.interleave import TimedOnly, run_interleaved
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.runs import Training, run_alone
from actstore.examples.faq.summary import (
    LOAD_FACTOR,
    Speedup,
    kept_table,
    load_note,
    quality_table,
    speed_table,
    speedup,
)

# -- speedups --------------------------------------------------------------------------------


def test_speedup_pools_rounds_and_gives_the_range_of_the_per_round_ratios() -> None:
    reference = [[2.0, 2.0], [4.0, 4.0], [3.0]]
    own = [[1.0, 1.0], [1.0, 1.0], [1.5]]
    got = speedup(reference, own)
    assert got.value == pytest.approx(3.0 / 1.1)  # mean of all reference steps / mean of all own steps
    assert (got.low, got.high, got.rounds) == (pytest.approx(2.0), pytest.approx(4.0), 3)
    assert got.format() == "2.73x [2.00-4.00]"
    assert Speedup(105.94, 89.48, 140.27, 3).format() == "106x [89.5-140]"  # three significant digits


def test_speedup_equals_the_ratio_of_epoch_times_for_the_same_steps_per_epoch() -> None:
    full = [[5.0, 6.0, 7.0], [5.5, 8.0, 6.5]]  # six steps: one epoch of full fine-tuning
    recycled = [[2.0, 2.5, 3.0], [2.0, 4.0, 2.5]]  # the same six batches
    assert speedup(full, recycled).value == pytest.approx(sum(map(sum, full)) / sum(map(sum, recycled)))


def test_speedup_with_one_round_says_so() -> None:
    assert speedup([[3.0]], [[1.0]]).format() == "3.00x (1 round)"


@pytest.mark.parametrize(("reference", "own", "match"), [
    ([], [], "at least one"),
    ([[1.0]], [[1.0], [1.0]], "same rounds"),
    ([[1.0], []], [[1.0], [1.0]], r"reference\[1\]"),
    ([[1.0]], [[0.0]], r"own\[0\].*positive"),
    ([[float("nan")]], [[1.0]], r"reference\[0\]"),
])
def test_speedup_refuses_what_it_cannot_compare(reference: Any, own: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        speedup(reference, own)


# -- the load note ---------------------------------------------------------------------------


def test_load_note_says_unreliable_only_above_the_threshold() -> None:
    assert LOAD_FACTOR == 1.25
    quiet = load_note(2.1, 2.5, 2)  # the job's own two threads on two cores: not a warning
    assert quiet.startswith("Load: the 1-minute load average was 2.1 before and 2.5 after") and "unreliable" not in quiet
    note = load_note(1.2, 6.6, 2)
    assert "1.2 before and 6.6 after" in note and "2 cores" in note and "timings unreliable" in note
    assert "\n" not in note and note.count("6.6") == 1  # one line, each figure once
    assert "unreliable" in load_note(3.0, 0.5, 2)  # before counts as much as after
    assert "unreliable" not in load_note(3.0, 3.0, 2, factor=2.0) and "unreliable" in load_note(4.1, 0.0, 2, factor=2.0)


@pytest.mark.parametrize(("args", "match"), [((1.0, 1.0, 0), "cores"), ((-1.0, 1.0, 2), "before"),
                                             ((1.0, float("inf"), 2), "after")])
def test_load_note_refuses_impossible_numbers(args: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_note(*args)


# -- quality against full fine-tuning ----------------------------------------------------------


def _row(name: str, ranks: list[int], **kw: Any) -> RowResult:
    row = RowResult(name, **kw)
    row.ranks = ranks
    return row


def test_quality_difference_to_full_fine_tuning_is_paired_over_the_questions() -> None:
    rng = random.Random(0)
    full = [rng.choice([1, 1, 2, 3, 5]) for _ in range(300)]
    firsts = [i for i, r in enumerate(full) if r == 1]
    worse = list(full)
    for i in firsts[:12]:  # 12 of the questions full fine-tuning ranks first drop to second
        worse[i] = 2
    base = [r + 1 for r in full]
    lines, diffs = quality_table(_row("baseline", base), _row("full fine-tuning", full),
                                 [_row("same", list(full)), _row("worse", worse)])
    assert diffs["same"].value == 0.0 and (diffs["same"].low, diffs["same"].high) == (0.0, 0.0)
    d = diffs["worse"]
    assert d.value == pytest.approx(-12 / 300)
    # Paired: every resample loses some of the 12, so the interval lies below zero, although both rows'
    # own RP@1 intervals (about +-0.055 wide on 300 questions) overlap almost entirely.
    assert d.high < 0 and d.low > -0.1
    head = kept_table({"same": diffs["same"], "worse": d}, {"same": Speedup(2.0, 1.8, 2.2, 3),
                                                             "worse": Speedup(150.0, 90.0, 210.0, 3)})
    assert head[2] == "| same | +0.000 [+0.000, +0.000]: no difference this validation set can resolve | 2.00x [1.80-2.20] |"
    assert head[3] == f"| worse | {d.format(signed=True)}: below full fine-tuning | 150x [90.0-210] |"
    assert d.format(signed=True).startswith("-0.040 [")
    # the quality table holds each row against the baseline; the difference to full fine-tuning is the headline's
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(table) == {"baseline", "full fine-tuning", "same", "worse"} and d.format(signed=True) not in lines[3]


def test_speed_table_gives_one_measured_epoch_time_and_one_size() -> None:
    full = RowResult("full fine-tuning", trainable_params=22_713_216, epoch_seconds=[120.0])
    rec = RowResult("50% recycling", trainable_params=10_646_784, epoch_seconds=[50.0], precompute_seconds=20.04,
                    disk_bytes=53_550_000)
    head = RowResult("head only", trainable_params=148_224, epoch_seconds=[0.5, 0.7], precompute_seconds=30.0,
                     disk_bytes=3_300_000)
    lines = speed_table(full, [rec, head], {"50% recycling": Speedup(1.9, 1.7, 2.0, 4)})
    assert lines[2] == "| full fine-tuning | 22,713,216 | 120 | - | - | - |"
    assert lines[3] == "| 50% recycling | 10,646,784 | 50 | 20.0 | 53.5 | 1.90x [1.70-2.00] |"
    assert lines[4] == "| head only | 148,224 | 0.6 | 30.0 | 3.3 | - |"
    assert "est" not in "\n".join(lines)


# -- runs: alone or interleaved, the same numbers ----------------------------------------------


def _training(name: str, seed: int, epochs: int = 2, n: int = 12, batch: int = 3) -> Training:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    x = torch.randn(n, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        batches.append([order[i : i + batch] for i in range(0, n, batch)])
    row = RowResult(name, epochs=epochs)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            row.rp1 = float(model(x).mean())

    return Training(row, model, lambda idx: model(x[idx]).pow(2).mean(), opt, sched, batches, evaluate,
                    torch.get_rng_state(), log=lambda m: None)


def test_a_run_gives_the_same_numbers_alone_and_interleaved() -> None:
    alone = [run_alone(_training(f"r{s}", s), progress=False) for s in (1, 2, 3)]
    runs = [_training(f"r{s}", s) for s in (1, 2, 3)]
    torch.manual_seed(99)  # other draws in between must not reach the runs' dropout
    got = run_interleaved(runs, 3, progress=False)
    together = [t.finish() for t in runs]
    for a, b in zip(alone, together, strict=True):
        assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
        assert a.rp1 == b.rp1
    assert got.count == 3
    assert [len(r) for r in got.seconds["r1"]] == [2, 3, 3]  # 8 steps in 3 rounds
    assert runs[0].row.epoch_seconds == pytest.approx([sum(runs[0].step_seconds[:4]), sum(runs[0].step_seconds[4:])])


def test_interleaved_rounds_alternate_the_runs_and_time_extra_steps_on_a_runs_batches() -> None:
    runs = [_training("long", 1, epochs=3), _training("short", 2, epochs=1)]  # 12 and 4 steps
    order: list[str] = []
    seen: list[list[int]] = []
    for t in runs:
        t.loss_of = (lambda f, name: lambda idx: (order.append(name), f(idx))[1])(t.loss_of, t.row.name)

    def extra(batch: list[int]) -> None:
        order.append("extra")
        seen.append(batch)

    got = run_interleaved(runs, 2, timed=[TimedOnly("extra", "long", extra, per_round=2)], progress=False)
    assert [len(r) for r in got.seconds["long"]] == [6, 6] and [len(r) for r in got.seconds["short"]] == [2, 2]
    # each round, the job furthest behind its share of the round goes next (the first listed on a tie)
    assert order[:10] == ["long", "short", "extra", "long", "long", "long", "short", "extra", "long", "long"]
    assert seen == runs[0].batches[0:2] + runs[0].batches[6:8]  # the first two batches "long" takes in each round
    assert got.on_shared_batches("extra") == [got.seconds["long"][0][:2], got.seconds["long"][1][:2]]


def test_run_interleaved_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rounds"):
        run_interleaved([_training("a", 1)], 0, progress=False)
    with pytest.raises(ValueError, match="own row name"):
        run_interleaved([_training("a", 1), _training("a", 2)], 2, progress=False)
    with pytest.raises(ValueError, match="names no run"):
        run_interleaved([_training("a", 1)], 2, timed=[TimedOnly("x", "b", lambda b: None)], progress=False)
    with pytest.raises(ValueError, match=r"per_round must lie in \[1, 4\]"):
        run_interleaved([_training("a", 1)], 2, timed=[TimedOnly("x", "a", lambda b: None, per_round=5)],
                        progress=False)
