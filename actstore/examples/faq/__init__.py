"""The question-answering recycling study: pairs, loss, metrics and the training runs.

This is the machinery behind ``python -m actstore.examples.demo`` and
``benchmarks/qa_recycling.py`` (the reproduction of Quaterion's layer-recycling
study on the cloud FAQ data).  A *pair* is a (question, answer) text pair; a
model embeds both, and training pulls each question towards its own answer and
away from the other answers of the batch.  It is an example of using the
library, not part of it: nothing in ``actstore`` outside ``actstore.examples``
imports it.

- :mod:`.data`: :func:`read_pairs` (a JSONL file), :func:`stdlib_pairs` (an
  offline default built from the standard library's docstrings),
  :func:`stratified_split`;
- :mod:`.model`: :func:`load_minilm` (offline), :class:`Tokenize` (the
  collate_fn), :func:`SkipConnectionHead`, :class:`LoraSpec` (the LoRA rows' adapters);
- :mod:`.losses`: :func:`mnrl_loss`, the symmetric multiple-negatives ranking loss;
- :mod:`.metrics`: :func:`retrieval_metrics` (questions against the answer
  corpus), :func:`pooled_pair_metrics` (Quaterion's pair metrics over all
  embeddings), :func:`bootstrap` (intervals over the validation questions);
- :mod:`.loops`: :func:`evaluate_model`, :func:`precompute_texts`, reading
  the stores;
- :mod:`.runs`: :class:`Training` (a run advanced step by step, with its own
  random state), :func:`prepare_full` / :func:`train_full`,
  :func:`prepare_recycled` / :func:`train_recycled`,
  :func:`prepare_head_only` / :func:`train_head_only`;
- :mod:`.interleave`: :func:`run_interleaved` (several runs in turn, every step
  timed, in rounds) and :class:`TimedOnly` steps beside them;
- :mod:`.timing`: :func:`time_steps` (interleaved step timing of every
  variant, for speedups that a loaded machine does not skew), the recomputing
  steps;
- :mod:`.summary`: :func:`speedup` (with its range over rounds),
  :func:`load_note`, the main job's tables.

Everything imports torch and sentence-transformers lazily, so importing this
package is cheap.
"""

from __future__ import annotations

from actstore.examples.faq.data import DEFAULT_STDLIB_MODULES, Pairs, read_pairs, stdlib_pairs, stratified_split
from actstore.examples.faq.interleave import Rounds, TimedOnly, run_interleaved
from actstore.examples.faq.loops import evaluate_model, precompute_texts
from actstore.examples.faq.losses import mnrl_loss
from actstore.examples.faq.metrics import Interval, RowResult, bootstrap, pooled_pair_metrics, retrieval_metrics
from actstore.examples.faq.model import LoraSpec, SkipConnectionHead, Tokenize, blocks_frozen, load_minilm
from actstore.examples.faq.runs import (
                                        Training,
                                        prepare_full,
                                        prepare_head_only,
                                        prepare_recycled,
                                        run_alone,
                                        train_full,
                                        train_head_only,
                                        train_recycled,
)
from actstore.examples.faq.summary import Speedup, kept_table, load_note, quality_table, speed_table, speedup
from actstore.examples.faq.timing import head_recompute_step, recompute_step, time_steps

__all__ = [
    "DEFAULT_STDLIB_MODULES",
    "Interval",
    "LoraSpec",
    "Pairs",
    "Rounds",
    "RowResult",
    "SkipConnectionHead",
    "Speedup",
    "TimedOnly",
    "Tokenize",
    "Training",
    "blocks_frozen",
    "bootstrap",
    "evaluate_model",
    "head_recompute_step",
    "kept_table",
    "load_minilm",
    "load_note",
    "mnrl_loss",
    "pooled_pair_metrics",
    "precompute_texts",
    "prepare_full",
    "prepare_head_only",
    "prepare_recycled",
    "quality_table",
    "read_pairs",
    "recompute_step",
    "retrieval_metrics",
    "run_alone",
    "run_interleaved",
    "speed_table",
    "speedup",
    "stdlib_pairs",
    "stratified_split",
    "time_steps",
    "train_full",
    "train_head_only",
    "train_recycled",
]
