"""The main job's summary: quality against full fine-tuning, speedups with their spread, and the load note.

Pure computations over numbers already measured (ranks, step seconds, load
averages), so that they can be checked on synthetic numbers:

- :func:`speedup`: a ratio of mean step times with its range over rounds;
- :func:`load_note`: the load line, which says when the machine's load makes the timings unreliable;
- :func:`kept_table` (each recycled row against full fine-tuning: the headline),
  :func:`quality_table`, :func:`speed_table`: the printed tables.

Each figure is printed once: the RP@1 difference to full fine-tuning and the
speedup over it in the headline table, the metrics and gains over the baseline
in the quality table, epoch times, sizes and the speedup over recomputing in the
cost table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from actstore.examples.faq.metrics import Interval, RowResult, bootstrap

__all__ = ["LOAD_FACTOR", "Speedup", "kept_table", "load_note", "quality_table", "speed_table", "speedup"]

#: The timings are called unreliable when the 1-minute load average exceeds this many times the core count.
#: The job itself keeps about as many threads busy as torch uses (by default one per core), so on a quiet
#: machine the load average sits near the core count; a quarter above it, other work took a share of the CPU.
LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class Speedup:
    """How many times faster than a reference: over all rounds (``value``) and its range over rounds."""

    value: float
    low: float
    high: float
    rounds: int

    def format(self) -> str:
        """``'2.20x [2.01-2.52]'``: three significant digits (two decimals below 10)."""
        if self.rounds < 2:
            return f"{_times(self.value)}x (1 round)"
        return f"{_times(self.value)}x [{_times(self.low)}-{_times(self.high)}]"


def _times(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def speedup(reference: Sequence[Sequence[float]], own: Sequence[Sequence[float]]) -> Speedup:
    """How many times faster ``own`` steps are than ``reference`` steps, overall and per round.

    Both hold step seconds per round (``[round][step]``), measured interleaved
    in the same rounds.  The value is the mean reference step over the mean
    own step, all rounds pooled — the ratio of the two epoch times when both
    take the same steps per epoch; ``low`` and ``high`` are the smallest and
    largest of the same ratio taken round by round.

    Raises
    ------
    ValueError
        No rounds, a different number of rounds, a round without steps, or a
        step time that is not a positive finite number.
    """
    if not reference or len(reference) != len(own):
        raise ValueError(f"reference, own: expected step seconds for the same rounds (at least one), got "
                         f"{len(reference)} and {len(own)} rounds")
    for name, rounds in (("reference", reference), ("own", own)):
        for r, steps in enumerate(rounds):
            if not steps or not all(math.isfinite(s) and s > 0 for s in steps):
                raise ValueError(f"{name}[{r}]: expected positive step seconds, got {list(steps)}; every round "
                                 "must hold at least one timed step")
    per_round = [_mean(ref) / _mean(mine) for ref, mine in zip(reference, own, strict=True)]
    value = _mean([s for r in reference for s in r]) / _mean([s for r in own for s in r])
    return Speedup(value, min(per_round), max(per_round), len(per_round))


def load_note(before: float, after: float, cores: int, factor: float = LOAD_FACTOR) -> str:
    """The load line: the 1-minute load average before and after the timing, and whether it makes the timings unreliable.

    The timings are called unreliable when either load exceeds ``factor`` x ``cores``.

    Raises
    ------
    ValueError
        ``cores`` below 1, ``factor`` not positive, or a negative or non-finite load.
    """
    if cores < 1:
        raise ValueError(f"cores: expected at least 1, got {cores}")
    if not factor > 0:
        raise ValueError(f"factor: expected a positive number, got {factor}")
    for name, v in (("before", before), ("after", after)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: expected a load average >= 0, got {v}")
    limit = factor * cores
    line = (f"Load: the 1-minute load average was {before:.1f} before and {after:.1f} after the timed training, "
            f"on {cores} cores")
    if max(before, after) <= limit:
        return f"{line} (at most {limit:.3g}, {factor:g} x the cores: the timings are not disturbed by other work)."
    return (f"{line}: timings unreliable — above {limit:.3g} ({factor:g} x the cores), other work competed for the "
            "CPU. The epoch times are inflated; the speedups, measured interleaved, less so (see their range over "
            "rounds).")


def quality_table(base: RowResult, full: RowResult, rows: Sequence[RowResult], *,
                  resamples: int = 2000) -> tuple[list[str], dict[str, Interval]]:
    """The quality table (every row against the baseline), and each of ``rows``' RP@1 difference to ``full``.

    Every interval is a 95% percentile bootstrap over the validation questions;
    a gain over the baseline and a difference to full fine-tuning are resampled
    paired (the same questions for both rows).  The differences (by row name)
    go to :func:`kept_table`.
    """
    lines = ["| row | RP@1 [95% interval] | RRK [95% interval] | RP@1 gain over baseline | RRK gain over baseline |",
             "|---|---|---|---|---|"]
    b = bootstrap(base.ranks, resamples=resamples)
    lines.append(f"| {base.name} | {b['rp1'].format()} | {b['rrk'].format()} | - | - |")
    diffs: dict[str, Interval] = {}
    for row in [full, *rows]:
        got = bootstrap(row.ranks, base.ranks, resamples=resamples)
        if row is not full:
            diffs[row.name] = bootstrap(row.ranks, full.ranks, resamples=resamples)["rp1_gain"]
        lines.append(f"| {row.name} | {got['rp1'].format()} | {got['rrk'].format()} | "
                     f"{got['rp1_gain'].format(signed=True)} | {got['rrk_gain'].format(signed=True)} |")
    return lines, diffs


def kept_table(diffs: dict[str, Interval], speedups: dict[str, Speedup]) -> list[str]:
    """The headline: per recycled row, its RP@1 difference to full fine-tuning (and what it says) and its speedup."""
    lines = ["| row | RP@1 vs full fine-tuning [95% interval] | speedup vs full fine-tuning [range over rounds] |",
             "|---|---|---|"]
    for name, d in diffs.items():
        if not d.excludes_zero():
            verdict = "no difference this validation set can resolve"
        elif d.value > 0:
            verdict = "above full fine-tuning"
        else:
            verdict = "below full fine-tuning"
        lines.append(f"| {name} | {d.format(signed=True)}: {verdict} | {speedups[name].format()} |")
    return lines


def speed_table(full: RowResult, rows: Sequence[RowResult], vs_recompute: dict[str, Speedup]) -> list[str]:
    """The cost table: trainable parameters, measured seconds per epoch, precompute, store size, speedup vs recomputing.

    The speedup over full fine-tuning is the headline's (:func:`kept_table`),
    the ratio of this table's epoch times.
    """
    lines = ["| row | trainable params | s/epoch | precompute s | store MB | speedup vs recomputing the frozen part "
             "[range over rounds] |", "|---|---|---|---|---|---|",
             f"| {full.name} | {full.trainable_params:,} | {_seconds(full.epoch_mean)} | - | - | - |"]
    for row in rows:
        rec = vs_recompute.get(row.name)
        pre = "-" if row.precompute_seconds is None else f"{row.precompute_seconds:.1f}"
        size = "-" if row.disk_bytes is None else f"{row.disk_bytes / 1e6:.1f}"
        lines.append(f"| {row.name} | {row.trainable_params:,} | {_seconds(row.epoch_mean)} | {pre} | {size} | "
                     f"{rec.format() if rec else '-'} |")
    return lines


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"
