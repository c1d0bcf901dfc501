"""Several training runs in turn, timed round by round: every row's epoch time and speedups from one measurement.

:func:`run_interleaved` takes prepared runs (:class:`~actstore.examples.faq.runs.Training`)
and splits each into ``rounds`` consecutive slices of its steps.  Within a
round the runs take their steps in turn, always the one furthest behind its
share of the round, so that a change of the machine's load slows every run
alike; each step is timed.  Steps timed only (:class:`TimedOnly`: the frozen
part recomputed every step, which the study does not train to the end) run in
the same rounds on batches that a run also takes, so the two are compared on
the same batches.

The result, :class:`Rounds`, holds every step's seconds per round: a run's
epoch time is the sum of its epoch's steps (in ``row.epoch_seconds``), a
speedup is a ratio of mean step times, and its spread over rounds comes from
the same numbers (:func:`actstore.examples.faq.summary.speedup`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import Any

from actstore.examples.faq.loops import progress_bar
from actstore.examples.faq.runs import Training

__all__ = ["Rounds", "TimedOnly", "run_interleaved"]


@dataclass(frozen=True)
class TimedOnly:
    """A training step that is timed but not trained to the end: ``step(batch)`` on run ``of``'s batches.

    In each round it takes the first ``per_round`` batches that run ``of`` (a
    row name) takes in that round.
    """

    name: str
    of: str
    step: Callable[[list[int]], None]
    per_round: int = 1


@dataclass
class Rounds:
    """Step seconds per round: ``seconds[name][r]`` lists the seconds of ``name``'s steps in round ``r``, in order."""

    seconds: dict[str, list[list[float]]] = field(default_factory=dict)
    #: Timed-only name -> the run whose batches it took.
    shares: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """How many rounds were run."""
        return len(next(iter(self.seconds.values()), []))

    def on_shared_batches(self, timed: str) -> list[list[float]]:
        """The seconds of the run that ``timed`` shares batches with, on those batches only (per round)."""
        own = self.seconds[self.shares[timed]]
        return [own_r[: len(t_r)] for own_r, t_r in zip(own, self.seconds[timed], strict=True)]


def _slices(total: int, rounds: int) -> list[tuple[int, int]]:
    return [(r * total // rounds, (r + 1) * total // rounds) for r in range(rounds)]


def run_interleaved(trainings: Sequence[Training], rounds: int, *, timed: Sequence[TimedOnly] = (),
                    progress: bool = True) -> Rounds:
    """Run every step of ``trainings`` in ``rounds`` interleaved rounds, with ``timed`` steps among them.

    The runs are left done but not finished: call ``finish()`` on each to
    evaluate (outside the timed rounds).  ``rounds`` is cut to the fewest steps
    of a run, so that every round holds a step of every run.

    Raises
    ------
    ValueError
        ``rounds`` below 1, no runs, two runs of one name, a run already
        started, or a :class:`TimedOnly` naming no run or asking for more
        batches per round than its run takes in a round.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    if not trainings:
        raise ValueError("trainings: expected at least one run, got none")
    by_name = {t.row.name: t for t in trainings}
    if len(by_name) != len(trainings):
        raise ValueError(f"trainings: every run needs its own row name, got {[t.row.name for t in trainings]}")
    started = [t.row.name for t in trainings if t.step_seconds]
    if started:
        raise ValueError(f"trainings: {started} already took steps; pass runs fresh from prepare_*")
    rounds = min(rounds, *(t.total_steps for t in trainings))
    slices = {t.row.name: _slices(t.total_steps, rounds) for t in trainings}
    for x in timed:
        if x.of not in by_name:
            raise ValueError(f"timed {x.name!r}: of={x.of!r} names no run; the runs are {sorted(by_name)}")
        fewest = min(b - a for a, b in slices[x.of])
        if not 1 <= x.per_round <= fewest:
            raise ValueError(f"timed {x.name!r}: per_round must lie in [1, {fewest}] (the fewest steps run "
                             f"{x.of!r} takes in a round), got {x.per_round}")
    out = Rounds({name: [[] for _ in range(rounds)] for name in [*by_name, *(x.name for x in timed)]},
                 {x.name: x.of for x in timed})
    batches = {t.row.name: t.batches for t in trainings}
    total = sum(t.total_steps for t in trainings) + rounds * sum(x.per_round for x in timed)
    bar = progress_bar(None, "training (interleaved rounds)", progress, total=total) if progress else None
    try:
        for r in range(rounds):
            jobs: list[tuple[str, int, Callable[[int], float]]] = []
            for t in trainings:
                a, b = slices[t.row.name][r]
                jobs.append((t.row.name, b - a, partial(_run_step, t)))
            for x in timed:
                a = slices[x.of][r][0]
                jobs.append((x.name, x.per_round, partial(_timed, x.step, batches[x.of][a:])))
            _round(jobs, out, r, bar)
    finally:
        if bar is not None:
            bar.close()
    return out


def _run_step(training: Training, j: int) -> float:
    return training.step()  # (the run takes its own next batch)


def _timed(step: Callable[[list[int]], None], batches: list[list[int]], j: int) -> float:
    """Time ``step`` on ``batches[j]``."""
    batch = batches[j]
    t0 = perf_counter()
    step(batch)
    return perf_counter() - t0


def _round(jobs: list[tuple[str, int, Callable[[int], float]]], out: Rounds, r: int, bar: Any) -> None:
    """Take every job's steps of round ``r``, always the job furthest behind its share."""
    done = [0] * len(jobs)
    while True:
        behind = [(done[i] / quota, i) for i, (_, quota, _) in enumerate(jobs) if done[i] < quota]
        if not behind:
            return
        i = min(behind)[1]
        name, _, take = jobs[i]
        out.seconds[name][r].append(take(done[i]))
        done[i] += 1
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
