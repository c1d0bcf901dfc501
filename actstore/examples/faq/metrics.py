"""The FAQ study's metrics: retrieval ranks, RP@1 and RRK, bootstrap intervals, and one table row's result.

RP@1 and RRK are means over validation queries, so a validation set of a few
hundred queries leaves them uncertain by a few points.  :func:`bootstrap`
resamples the queries to put an interval on each row and, paired over the same
resampled queries, on each row's gain over a reference row (the untrained
model): the interval that says whether training helped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Interval", "RowResult", "bootstrap", "pooled_pair_metrics", "retrieval_metrics", "retrieval_ranks"]


def retrieval_ranks(q_emb: Any, a_emb: Any, relevant: Sequence[int]) -> list[int]:
    """The rank (1 = nearest) of each question's relevant answer among the corpus ``a_emb``, by cosine similarity.

    ``relevant[i]`` is the corpus index of question ``i``'s answer.  Ties count
    in the question's favour (only strictly more similar answers rank above).
    """
    import torch
    from torch.nn import functional as F

    if len(q_emb) != len(relevant):
        raise ValueError(f"relevant: expected one corpus index per question ({len(q_emb)}), got {len(relevant)}")
    sims = F.normalize(q_emb.float(), dim=-1) @ F.normalize(a_emb.float(), dim=-1).T
    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    target = sims[torch.arange(len(rel)), rel]
    return (1 + (sims > target[:, None]).sum(dim=1)).tolist()


def _rp1_rrk(ranks: Sequence[int]) -> tuple[float, float]:
    return sum(r == 1 for r in ranks) / len(ranks), sum(1.0 / r for r in ranks) / len(ranks)


def retrieval_metrics(q_emb: Any, a_emb: Any, relevant: Sequence[int]) -> tuple[float, float]:
    """(RP@1, RRK) of questions searching the answer corpus by cosine similarity.

    ``relevant[i]`` is the corpus index of question ``i``'s answer (one relevant
    answer per question).  RP@1 is the fraction of questions whose nearest answer
    is theirs (retrieval precision at 1 with one relevant item); RRK the mean
    reciprocal rank of the relevant answer.
    """
    return _rp1_rrk(retrieval_ranks(q_emb, a_emb, relevant))


def pooled_pair_metrics(q_emb: Any, a_emb: Any) -> tuple[float, float]:
    """(RP@1, RRK) as Quaterion's pair metrics compute them over all embeddings.

    Questions and answers of the validation pairs form one pool of ``2n``
    embeddings; each one queries the others (itself excluded) and its only
    relevant item is the other half of its pair.
    """
    import torch
    from torch.nn import functional as F

    n = len(q_emb)
    emb = F.normalize(torch.cat([q_emb.float(), a_emb.float()]), dim=-1)
    sims = emb @ emb.T
    sims.fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    target = sims[torch.arange(2 * n), partner]
    rank = 1 + (sims > target[:, None]).sum(dim=1)
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


@dataclass(frozen=True)
class Interval:
    """A value and its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def format(self, signed: bool = False) -> str:
        f = "+.3f" if signed else ".3f"
        return f"{self.value:{f}} [{self.low:{f}}, {self.high:{f}}]"


def bootstrap(ranks: Sequence[int], reference: Sequence[int] | None = None, *, resamples: int = 2000,
              level: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Percentile-bootstrap intervals of RP@1 and RRK over the queries, and of the gain over ``reference``.

    Parameters
    ----------
    ranks
        Per-query ranks of the relevant answer (:func:`retrieval_ranks`).
    reference
        Per-query ranks of the same queries under another model (the baseline);
        adds ``rp1_gain`` and ``rrk_gain``, ``ranks``' metric minus the
        reference's, resampled paired (the same queries for both), so that what
        the two share (hard and easy queries) cancels out of the interval.
    resamples, level, seed
        Number of resamples, the interval's coverage, the generator's seed (the
        same seed draws the same resamples for every row).

    Returns
    -------
    dict
        ``rp1`` and ``rrk`` (and with ``reference``, ``rp1_gain`` and ``rrk_gain``)
        as :class:`Interval`.

    Raises
    ------
    ValueError
        Empty ranks, a rank below 1, ``reference`` of another length, or
        ``level`` outside (0, 1).
    """
    import numpy as np

    r = np.asarray(list(ranks), dtype=np.float64)
    if r.ndim != 1 or len(r) == 0 or (r < 1).any():
        raise ValueError(f"ranks: expected a non-empty list of ranks >= 1, got {len(r)} values (min "
                         f"{r.min() if len(r) else None})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    cols = {"rp1": (r == 1).astype(np.float64), "rrk": 1.0 / r}
    if reference is not None:
        ref = np.asarray(list(reference), dtype=np.float64)
        if ref.shape != r.shape or (ref < 1).any():
            raise ValueError(f"reference: expected {len(r)} ranks >= 1 (one per query of ranks), got {len(ref)}")
        cols["rp1_gain"] = cols["rp1"] - (ref == 1)
        cols["rrk_gain"] = cols["rrk"] - 1.0 / ref
    idx = np.random.default_rng(seed).integers(0, len(r), size=(resamples, len(r)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, per_query in cols.items():
        means = per_query[idx].mean(axis=1)
        out[name] = Interval(float(per_query.mean()), float(np.percentile(means, lo)), float(np.percentile(means, hi)))
    return out


@dataclass
class RowResult:
    """One row of the experiment's table."""

    name: str
    frozen_blocks: int | None = None
    rp1: float = float("nan")
    rrk: float = float("nan")
    pooled_rp1: float = float("nan")
    pooled_rrk: float = float("nan")
    epochs: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    precompute_seconds: float | None = None
    disk_bytes: int | None = None
    trainable_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    #: Per validation question, the rank of its answer (what :func:`bootstrap` resamples).
    ranks: list[int] = field(default_factory=list)

    @property
    def epoch_mean(self) -> float | None:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None

    def set_metrics(self, q_emb: Any, a_emb_pairs: Any, a_emb_corpus: Any, relevant: Sequence[int]) -> None:
        """Fill the metrics from question, paired-answer and corpus embeddings."""
        self.ranks = retrieval_ranks(q_emb, a_emb_corpus, relevant)
        self.rp1, self.rrk = _rp1_rrk(self.ranks)
        self.pooled_rp1, self.pooled_rrk = pooled_pair_metrics(q_emb, a_emb_pairs)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON (without the per-question ranks)."""
        d = asdict(self)
        del d["ranks"]
        d["epoch_mean_seconds"] = self.epoch_mean
        return d

