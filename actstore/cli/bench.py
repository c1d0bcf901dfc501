"""``actstore bench``: should I recycle, and how much?  Measured on your machine, with your model.

Given a model (``--model MODULE:FACTORY``) and a data sample (``--data
MODULE:FACTORY``), it measures the time of a training epoch over the sample for

- **full fine-tuning** (every parameter trained),
- **recompute** at each depth: the first blocks frozen and recomputed (under
  ``no_grad``) every step, the rest trained, and
- **recycled** at each depth: the frozen blocks' output precomputed once into a
  store, the rest trained from the store,

at the depths ``0%`` (only the stem — embeddings, ResNet stem — frozen),
``25%``, ``50%``, ``75%`` and ``100%`` of the blocks (``split(model, at)``
decides the blocks, see :mod:`actstore.models.split`), plus the
one-off precompute time and the store's size on disk.  It prints the speedups
and the *break-even*: the number of epochs after which precompute plus recycled
epochs cost less than recomputing (or than full fine-tuning).

``100%`` freezes every block: what the model has after its last block trains
(a ResNet's ``fc``).  It is not called "head only": in the main job and the
experiments, "head only" means every block frozen *and* a head trained on the
model's output, and some models have no trainable parameters after their last
block (a sentence-transformers model's pooling and normalisation): their
``100%`` row has nothing to train, says so, and has no timing.  To time a
head of your own there, give a model factory whose model ends with it.

Step times are measured interleaved — every variant runs ``--steps`` steps in
turn, for ``--rounds`` rounds, on the same fixed batches — and the median step
time times the steps of an epoch over the sample is the epoch time, so a
machine whose load changes during the run slows every variant alike.  Epoch and
precompute times scale with the sample; the speedups and break-even do not.

The training target.  ``loss_fn(output) -> scalar`` may come from the model
factory (return ``(model, collate_fn, loss_fn)``) or ``--loss MODULE:FN``.  By
default it is a self-supervised regression: the mean square of a fixed random
projection (seeded, to 16 dimensions) of the output's last dimension — a
target whose own cost is one small matmul, so that the times are those of the
forward and backward passes.  The output is the model's (or head's) return
value reduced to one tensor: a tensor itself, else ``last_hidden_state`` /
``sentence_embedding`` / the first tensor field.

Out of memory.  When a step or a precompute runs out of memory
(``torch.OutOfMemoryError`` or a ``RuntimeError`` saying "out of memory"), the
whole measurement restarts at half the batch size, and says so; at batch size
``--min-batch-size`` it stops with a message.

The functions here import torch lazily: importing this module (``actstore``'s
command line does it at start-up) costs nothing.

Layout: this module is the command (arguments, factories, exit codes) and
re-exports the API; :mod:`actstore.cli.bench_timing` measures
(:func:`run_bench`), :mod:`actstore.cli.bench_report` holds the results and
writes them (table, JSON, plot).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from actstore.cli.bench_report import BenchReport, BenchRow, machine_description, plot, write
from actstore.cli.bench_timing import DEFAULT_DEPTHS, default_loss, is_oom, run_bench
from actstore.cli.registry import command
from actstore.errors import BenchError, FactoryError

__all__ = ["BenchError", "BenchReport", "BenchRow", "default_loss", "is_oom", "machine_description", "plot",
           "run_bench", "write"]


def _unpack_model(made: Any, spec: str) -> tuple[Any, Any, Any]:
    from torch import nn

    model, collate, loss = made, None, None
    if isinstance(made, tuple):
        if len(made) == 2:
            model, collate = made
        elif len(made) == 3:
            model, collate, loss = made
        else:
            raise BenchError(f"--model {spec} returned a tuple of {len(made)}; expected model, (model, collate_fn) "
                             "or (model, collate_fn, loss_fn)")
    if not isinstance(model, nn.Module):
        raise BenchError(f"--model {spec} returned {type(model).__name__}; expected a torch.nn.Module (or a tuple "
                         "starting with one)")
    return model, collate, loss



# -- the command ---------------------------------------------------------------------------


def _parse_depths(text: str) -> list[float | str]:
    """``0,25,50%,0.75,100,layer3``: numbers above 1 are percentages; other words are split point names.

    ``all`` is 100%; ``head`` and ``head-only``, the row's former names, are taken as 100% too.
    """
    out: list[float | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part in ("all", "head", "head-only"):
            out.append(1.0)
            continue
        try:
            v = float(part.rstrip("%"))
        except ValueError:
            out.append(part)  # a split point name, checked against the model later
            continue
        out.append(v / 100 if v > 1 or part.endswith("%") else v)
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from actstore.cli.factories import call_factory, load_factory

    try:
        made = call_factory(args.model, "--model")
        model, collate, loss = _unpack_model(made, args.model)
        data = call_factory(args.data, "--data")
        if args.loss:
            loss = load_factory(args.loss, "--loss")
        augment = call_factory(args.augment, "--augment") if args.augment else None
        if augment is not None and not callable(augment):
            raise BenchError(f"--augment {args.augment} returned {type(augment).__name__}; expected the augment "
                             "function fn(sample, generator) -> sample")
        if (augment is None) != (args.augmentations == 1) or args.augmentations < 1:
            raise BenchError(f"--augment and --augmentations go together: --augmentations K (K >= 2) stored "
                             f"augmentations of --augment's function (got --augmentations {args.augmentations}"
                             f"{'' if augment else ' without --augment'})")
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            data = list(data)
        if args.limit:
            data = [data[i] for i in range(min(args.limit, len(data)))]
    except (FactoryError, BenchError) as e:
        print(f"actstore bench: error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_bench(model, data, collate_fn=collate, loss_fn=loss, depths=args.depths,
                           batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
                           store_dtype=args.dtype, device=args.device, workdir=args.workdir,
                           min_batch_size=args.min_batch_size, progress=not args.quiet, name=args.model,
                           log=lambda m: print(m, file=sys.stderr, flush=True), augment=augment,
                           augmentations=args.augmentations)
    except BenchError as e:
        print(f"actstore bench: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:  # split points, split inside a block, unsupported model
        from actstore.errors import StoreError

        if isinstance(e, StoreError):
            raise
        print(f"actstore bench: error: {e}", file=sys.stderr)
        return 1
    print(report.markdown(), flush=True)
    if args.out:
        try:
            paths = write(report, args.out, with_plot=not args.no_plot)
        except ImportError as e:
            print(f"actstore bench: error: {e}; the table was written to {args.out}.md and {args.out}.json",
                  file=sys.stderr)
            return 1
        print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0


@command("bench", "measure whether recycling pays off for your model: epoch times, speedups, break-even")
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "The default training target is self-supervised: the mean square of a fixed random projection "
        "(to 16 dims) of the output's last dimension -- its cost is negligible, so the times are those of the "
        "forward and backward passes. A factory returning (model, collate_fn, loss_fn), or --loss, replaces it. "
        "Example: actstore bench --model actstore.examples.demo:minilm --data actstore.examples.demo:stdlib_texts --out bench/minilm")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="callable returning the model, (model, collate_fn) or (model, collate_fn, loss_fn); "
                        "MODULE may be a .py path")
    p.add_argument("--data", required=True, metavar="MODULE:FACTORY", help="callable returning the data sample")
    p.add_argument("--loss", metavar="MODULE:FN", help="loss_fn(output) -> scalar tensor (default: see below)")
    p.add_argument("--depths", type=_parse_depths, default=list(DEFAULT_DEPTHS), metavar="LIST",
                   help="fractions (or percentages) of the blocks to freeze, 0 = the stem only, "
                        "1, 100 or 'all' = every block (the row '100%%'), or split point names such as layer3 "
                        "(default 0,25,50,75,100)")
    p.add_argument("--augment", metavar="MODULE:FACTORY",
                   help="callable returning fn(sample, generator) -> augmented sample: full fine-tuning and "
                        "recompute augment on the fly, recycling stores --augmentations of each item")
    p.add_argument("--augmentations", type=int, default=1, metavar="K",
                   help="stored augmentations per item with --augment (K >= 2; K x the precompute and disk)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--min-batch-size", type=int, default=1,
                   help="stop instead of halving the batch size below this on out-of-memory (default 1)")
    p.add_argument("--steps", type=int, help="steps per variant per round (default: an epoch, at most 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (default 2)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N items of the data only")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="dtype of the stored activations")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--workdir", help="directory for the temporary stores (default: the system temp dir)")
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.md, PREFIX.json and PREFIX.png (matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="with --out: skip the PNG")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)
