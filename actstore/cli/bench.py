"""``actstore bench``: should I recycle, and how much?  Measured on your machine, with your model.

Given a model (``--model MODULE:FACTORY``) and a data sample (``--data
MODULE:FACTORY``), it measures the time of a training epoch over the sample for

- **full fine-tuning** (every parameter trained),
- **recompute** at each depth: the first blocks frozen and recomputed (under
  ``no_grad``) every step, the rest trained, and
- **recycled** at each depth: the frozen blocks' output precomputed once into a
  store, the rest trained from the store,

at the depths ``0%`` (only the stem — embeddings, ResNet stem — frozen),
``25%``, ``50%``, ``75%`` of the blocks, and ``head only`` (every block frozen;
``split(model, at)`` decides the blocks, see :mod:`actstore.models.split`), plus the
one-off precompute time and the store's size on disk.  It prints the speedups
and the *break-even*: the number of epochs after which precompute plus recycled
epochs cost less than recomputing (or than full fine-tuning).

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from actstore.cli.registry import command
from actstore.errors import BenchError, FactoryError

__all__ = ["BenchError", "BenchReport", "BenchRow", "default_loss", "is_oom", "run_bench"]

#: The default depths: fractions of the blocks frozen (0: the stem only; 1: every block, "head only").
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class _OutOfMemory(Exception):
    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__(where)
        self.where = where
        self.error = error


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (CUDA, MPS or the CPU allocator)."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(error, MemoryError) or (oom_type is not None and isinstance(error, oom_type)):
        return True
    msg = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


# -- results ------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One line of the table: a training variant and its costs."""

    name: str
    split_point: str | None = None
    frozen_blocks: int | None = None
    trainable_params: int = 0
    epoch_seconds: float | None = None
    recompute_epoch_seconds: float | None = None
    precompute_seconds: float | None = None
    disk_bytes: int | None = None
    speedup_vs_full: float | None = None
    speedup_vs_recompute: float | None = None
    breakeven_vs_recompute: float | None = None
    breakeven_vs_full: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    """What :func:`run_bench` measured."""

    model: str
    family: str
    blocks: int
    samples: int
    batch_size: int
    steps_per_epoch: int
    steps: int
    rounds: int
    device: str
    store_dtype: str | None
    machine: str
    rows: list[BenchRow] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        cols = ["variant", "split after", "frozen blocks", "trainable params", "s/epoch", "recompute s/epoch",
                "precompute s", "disk MB", "speedup vs full", "speedup vs recompute", "break-even vs recompute",
                "break-even vs full"]
        lines = [f"### actstore bench: {self.model}", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [r.name, r.split_point or "-", _cell(r.frozen_blocks), f"{r.trainable_params:,}",
                     _cell(r.epoch_seconds), _cell(r.recompute_epoch_seconds), _cell(r.precompute_seconds),
                     _cell(r.disk_bytes / 1e6 if r.disk_bytes is not None else None),
                     _x(r.speedup_vs_full), _x(r.speedup_vs_recompute), _epochs(r.breakeven_vs_recompute),
                     _epochs(r.breakeven_vs_full)]
            if r.note:
                cells[4] = f"{cells[4]} ({r.note})"
            lines.append("| " + " | ".join(cells) + " |")
        notes = [
            f"Machine: {self.machine}; device {self.device}.",
            f"Model: {self.family}, {self.blocks} blocks. Sample: {self.samples:,} items, batch size "
            f"{self.batch_size}, {self.steps_per_epoch} steps per epoch over the sample.",
            f"Epoch time = median step time x {self.steps_per_epoch}; steps measured interleaved "
            f"({self.rounds} rounds x {self.steps} steps of every variant, same batches, after a warm-up step).",
            "Break-even: epochs after which precompute + recycled epochs cost less than recompute (or full) "
            "epochs; 'never' when recycling is not faster per epoch.",
            f"Store dtype: {self.store_dtype or 'the output dtype'}. Total wall time {self.wall_seconds:.1f} s.",
            *self.notes,
        ]
        return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _cell(v: float | int | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _epochs(v: float | None) -> str:
    if v is None:
        return "-"
    return "never" if math.isinf(v) else f"{v:.2f}"


# -- the default loss ----------------------------------------------------------------------


class default_loss:  # noqa: N801 - used like a function
    """Mean square of a fixed random projection (to ``dim`` dimensions) of the output's last dimension.

    The projection is drawn once per input width from a generator seeded with
    ``seed``, so every variant trains towards the same target.
    """

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed
        self._proj: dict[tuple[int, Any, Any], Any] = {}

    def __call__(self, output: Any) -> Any:
        import torch

        y = _output_tensor(output)
        if not y.is_floating_point():
            raise BenchError(f"the model's output is a {y.dtype} tensor; the default loss needs a floating one "
                             "(give a loss_fn: return (model, collate_fn, loss_fn) from the factory, or --loss)")
        width = y.shape[-1] if y.ndim else 1
        k = (width, y.device, y.dtype)
        if k not in self._proj:
            gen = torch.Generator().manual_seed(self.seed)
            self._proj[k] = (torch.randn(width, self.dim, generator=gen) / math.sqrt(width)).to(y.device, y.dtype)
        return (y.reshape(-1, width) @ self._proj[k]).pow(2).mean()


def _output_tensor(output: Any) -> Any:
    from actstore.models.capture import reduce_output

    return reduce_output(output, "output")


# -- model plumbing ------------------------------------------------------------------------


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


def _to(batch: Any, device: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()}) if isinstance(batch, dict) else \
            {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(_to(v, device) for v in batch) if isinstance(batch, list) else \
            tuple(_to(v, device) for v in batch)
    return batch


def _call(module: Any, batch: Any) -> Any:
    from actstore.models.capture import model_arguments
    from actstore.models.split import BertFrozen

    if isinstance(module, BertFrozen) and isinstance(batch, Mapping):
        return module(batch)
    args, kwargs = model_arguments(module, batch)
    return module(*args, **kwargs)


def _takes_mask(head: Any) -> bool:
    from actstore.models.split import BertHead, SentenceTransformerHead

    return isinstance(head, (BertHead, SentenceTransformerHead))


def _inputs(item: Any) -> Any:
    """The model input of a data item: a tuple's first element, a dict's ``input``-like key, else the item."""
    if isinstance(item, tuple) and item:
        return item[0]
    if isinstance(item, Mapping):
        for k in ("input", "inputs", "text", "image", "x"):
            if k in item:
                return item[k]
    return item


@dataclass
class _Depth:
    label: str
    at: str
    blocks: int


def _depths(model: Any, depths: Sequence[float | str]) -> tuple[str, int, list[_Depth]]:
    """Resolve depths to distinct split points.

    A float is a fraction of the blocks (0: the stem; 1: every block, or all
    but the last child of a plain ``nn.Sequential``); a str is a split point
    name, checked by :func:`actstore.models.split.split` (an unknown name or one inside
    a block raises ``ValueError`` listing the valid split points).
    """
    from actstore.models.split import _plan, _resolve_at, split_points

    plan = _plan(model)
    points = split_points(model)
    n = len(plan.blocks)
    out: list[_Depth] = []
    seen: set[str] = set()
    for d in depths:
        if isinstance(d, str):
            at = _resolve_at(model, plan, d)
            k = plan.blocks.index(at) + 1 if at in plan.blocks else 0
            label = at
        else:
            if not 0.0 <= d <= 1.0:
                raise BenchError(f"depth {d!r}: a fraction of blocks to freeze must lie in [0, 1] "
                                 f"(or name a split point: {points})")
            if d == 0.0:
                if not plan.stems:
                    continue  # a plain Sequential has no stem: no 0% row
                at, k, label = plan.stems[0], 0, "0%"
            else:
                k = math.floor(d * n + 0.5)
                if plan.family == "sequential":
                    k = min(k, n - 1)  # the head must keep at least the last child
                if k < 1:
                    continue
                at = plan.blocks[k - 1]
                label = "head only" if d == 1.0 else f"{round(d * 100)}%"
        if at in seen:
            continue
        seen.add(at)
        out.append(_Depth(label, at, k))
    if not out:
        raise BenchError(f"no depth in {list(depths)} gives a split point of this model; its split points: {points}")
    return plan.family, n, out


# -- measuring -----------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def run_bench(model: Any, data: Sequence[Any], *, collate_fn: Callable[[list[Any]], Any] | None = None,
              loss_fn: Callable[[Any], Any] | None = None, depths: Sequence[float | str] = DEFAULT_DEPTHS,
              batch_size: int = 32, steps: int | None = None, rounds: int = 2, store_dtype: str | None = None,
              device: str | None = None, workdir: str | None = None, min_batch_size: int = 1,
              progress: bool = True, name: str | None = None, log: Callable[[str], None] = print) -> BenchReport:
    """Measure full fine-tuning, recomputation and recycling of ``model`` over ``data``.

    Parameters
    ----------
    model
        A model :func:`actstore.models.split.split` can split (nn.Sequential, a
        torchvision-style ResNet, a BERT-style encoder, a sentence-transformers
        model).  Its weights are changed by the training steps: pass a copy if
        you need it afterwards.
    data
        The sample: a sequence of raw items (a tuple's first element, or a
        dict's ``input``/``text``/``image``/``x`` key, is the model input).
    collate_fn
        A list of inputs -> the model's batch (default ``default_collate``).
    loss_fn
        ``loss_fn(output) -> scalar tensor`` (default :class:`default_loss`).
    depths
        Fractions of the blocks to freeze (0: the stem; 1: every block), or
        split point names (see :func:`actstore.models.split.split_points`).
    batch_size, steps, rounds
        Items per step; steps per variant per round (default: an epoch over
        the sample, at most 10); interleaved rounds.
    store_dtype
        dtype of the stored activations (default: the output's).
    device
        Default: CUDA when available, else the CPU.
    workdir
        Where the stores are written (default: a temporary directory; removed).
    min_batch_size
        Out of memory at this batch size stops the run (smaller: retried at half).

    Returns
    -------
    BenchReport
    """
    import torch

    if batch_size < 1 or min_batch_size < 1:
        raise BenchError("batch_size and min_batch_size must be positive")
    if len(data) < 1:
        raise BenchError("the data sample is empty")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family, n_blocks, resolved = _depths(model, depths)
    bs = min(batch_size, len(data))
    while True:
        try:
            return _run(model, data, collate_fn, loss_fn or default_loss(), resolved, family, n_blocks, bs,
                        steps, rounds, store_dtype, dev, workdir, progress, name or type(model).__name__, log)
        except _OutOfMemory as e:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if bs <= min_batch_size:
                raise BenchError(
                    f"out of memory in {e.where} at batch size {bs}, the smallest allowed (--min-batch-size "
                    f"{min_batch_size}): the model does not fit on {dev} for training. Use a smaller model or "
                    f"input, another device, or deeper recycling only (--depths). ({type(e.error).__name__}: "
                    f"{str(e.error).splitlines()[0] if str(e.error) else ''})") from e.error
            new = max(min_batch_size, bs // 2)
            log(f"actstore bench: out of memory in {e.where} at batch size {bs}; lowering the batch size to "
                f"{new} and starting over")
            bs = new


def _run(model: Any, data: Sequence[Any], collate_fn: Any, loss_fn: Any, depths: list[_Depth], family: str,
         n_blocks: int, bs: int, steps: int | None, rounds: int, store_dtype: str | None, dev: Any,
         workdir: str | None, progress: bool, name: str, log: Callable[[str], None]) -> BenchReport:
    import random
    import statistics

    import torch
    from torch.utils.data import default_collate

    from actstore.models.split import split
    from actstore.precompute.api import precompute
    from actstore.training.collate import ActivationCollate
    from actstore.training.datasets import ActivationDataset

    started = time.perf_counter()
    collate = collate_fn or default_collate
    inputs = [_inputs(item) for item in data]
    n = len(inputs)
    steps_per_epoch = math.ceil(n / bs)
    n_steps = steps or min(steps_per_epoch, 10)
    rng = random.Random(0)
    batches = [rng.sample(range(n), min(bs, n)) for _ in range(n_steps)]
    model.to(dev)
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    rows: list[BenchRow] = []
    variants: list[tuple[str, Callable[[list[int]], None]]] = []
    root = tempfile.mkdtemp(prefix="actstore-bench-", dir=workdir)
    stores: list[Any] = []

    def guard(where: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are turned into a retry
            if is_oom(e):
                raise _OutOfMemory(where, e) from e
            raise

    def train_step(params: list[Any], opt: Any, forward: Callable[[], Any]) -> None:
        loss = loss_fn(forward())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def make_batch(idx: list[int]) -> Any:
        return _to(collate([inputs[i] for i in idx]), dev)

    # full fine-tuning
    all_params = [p for p in model.parameters() if p.requires_grad]
    opt_full = torch.optim.AdamW(all_params, lr=1e-12)
    variants.append(("full", lambda idx: train_step(all_params, opt_full,
                                                     lambda: _call(model.train(), make_batch(idx)))))
    rows.append(BenchRow("full fine-tuning", None, 0, sum(p.numel() for p in all_params)))

    try:
        for d in depths:
            frozen, head = split(model, d.at)
            head_params = [p for p in head.parameters() if p.requires_grad]
            row = BenchRow(d.label, d.at, d.blocks, sum(p.numel() for p in head_params))
            rows.append(row)
            path = os.path.join(root, f"store-{len(rows)}")
            log(f"actstore bench: precomputing {d.label} (split after {d.at}) over {n:,} items")
            t0 = time.perf_counter()
            store = guard(f"precompute at {d.at}", lambda path=path, at=d.at: precompute(
                model, inputs, path, layers=[at], batch_size=bs, device=dev, collate_fn=collate_fn,
                store_dtype=store_dtype, progress=progress, overwrite=True))
            row.precompute_seconds = time.perf_counter() - t0
            stores.append(store)
            row.disk_bytes = int(store.info()["bytes_on_disk"])
            if not head_params:
                row.note = "the head has no trainable parameters"
                continue
            field_name = next(f for f in store.fields if not f.startswith("item_"))
            ds = ActivationDataset(store, fields=[field_name])
            rows_of = store.view("dataset")
            gather = ActivationCollate(param_dtype if param_dtype.is_floating_point else None,
                                       mask_dtype=torch.int64)
            opt = torch.optim.AdamW(head_params, lr=1e-12)
            masked = _takes_mask(head)

            def run_head(hidden: Any, mask: Any, head: Any = head, masked: bool = masked) -> Any:
                head.train()
                return head(hidden, mask) if masked else head(hidden)

            def recompute(idx: list[int], frozen: Any = frozen, run_head: Any = run_head, opt: Any = opt,
                          head_params: list[Any] = head_params) -> None:
                batch = make_batch(idx)
                frozen.eval()
                with torch.no_grad():
                    hidden = _output_tensor(_call(frozen, batch))
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                train_step(head_params, opt, lambda: run_head(hidden, mask))

            def recycled(idx: list[int], ds: Any = ds, rows_of: Any = rows_of, gather: Any = gather,
                         field_name: str = field_name, run_head: Any = run_head, opt: Any = opt,
                         head_params: list[Any] = head_params) -> None:
                got = gather(ds.__getitems__(rows_of[idx].tolist()))[field_name]
                if isinstance(got, tuple):  # a ragged field: (values, mask, lengths)
                    hidden, mask = got[0].to(dev, non_blocking=True), got[1].to(dev, non_blocking=True)
                else:
                    hidden, mask = got.to(dev, non_blocking=True), None
                train_step(head_params, opt, lambda: run_head(hidden, mask))

            variants.append((f"recompute@{d.at}", recompute))
            variants.append((f"recycled@{d.at}", recycled))

        times: dict[str, list[float]] = {v: [] for v, _ in variants}
        bar = _progress(len(variants) * (1 + rounds * n_steps), "timing steps", progress)
        for r in range(rounds + 1):  # round 0: one warm-up step of every variant, not timed
            for vname, step in variants:
                for idx in batches[:1] if r == 0 else batches:
                    t0 = time.perf_counter()
                    guard(f"a training step ({vname})", step, idx)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if r > 0:
                        times[vname].append(time.perf_counter() - t0)
                    if bar is not None:
                        bar.set_postfix_str(vname)
                        bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for s in stores:
            s.close()
        shutil.rmtree(root, ignore_errors=True)

    median = {v: statistics.median(ts) for v, ts in times.items() if ts}
    full_epoch = median["full"] * steps_per_epoch
    rows[0].epoch_seconds = full_epoch
    rows[0].speedup_vs_full = 1.0
    for row in rows[1:]:
        if f"recycled@{row.split_point}" not in median:
            continue
        rec = median[f"recompute@{row.split_point}"] * steps_per_epoch
        own = median[f"recycled@{row.split_point}"] * steps_per_epoch
        row.epoch_seconds, row.recompute_epoch_seconds = own, rec
        row.speedup_vs_full = full_epoch / own
        row.speedup_vs_recompute = rec / own
        pre = row.precompute_seconds or 0.0
        row.breakeven_vs_recompute = pre / (rec - own) if rec > own else math.inf
        row.breakeven_vs_full = pre / (full_epoch - own) if full_epoch > own else math.inf
    from actstore import __version__

    report = BenchReport(
        model=name, family=family, blocks=n_blocks, samples=n, batch_size=bs, steps_per_epoch=steps_per_epoch,
        steps=n_steps, rounds=rounds, device=str(dev), store_dtype=store_dtype, machine=machine_description(), rows=rows,
        step_seconds=median, wall_seconds=time.perf_counter() - started,
        notes=[f"actstore {__version__}."])
    return report


def machine_description() -> str:
    """One line describing this machine (CPU, cores, GPU, memory, Python, torch) for reports."""
    import os as _os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    mem = ""
    try:
        mem = f", {_os.sysconf('SC_PAGE_SIZE') * _os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return (f"{cpu}, {_os.cpu_count()} cores{mem}{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


# -- output ------------------------------------------------------------------------------


def plot(report: BenchReport, path: str) -> None:
    """A PNG: epoch time per variant (bars: recycled and recompute), speedups annotated.  Needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib (pip install matplotlib, or actstore[bench])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.epoch_seconds is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.2))
    xs = list(range(len(rows)))
    paired = [r.recompute_epoch_seconds is not None for r in rows]
    left = [x - 0.2 if p else x for x, p in zip(xs, paired, strict=True)]
    ax.bar(left[:1], [rows[0].epoch_seconds or 0.0], 0.4, color="tab:gray", label="full fine-tuning")
    ax.bar(left[1:], [r.epoch_seconds or 0.0 for r in rows[1:]], 0.4, color="tab:blue",
           label="recycled (trained from the store)")
    ax.bar([x + 0.2 for x, p in zip(xs, paired, strict=True) if p],
           [r.recompute_epoch_seconds or 0.0 for r in rows if r.recompute_epoch_seconds is not None], 0.4,
           color="tab:orange", label="frozen prefix recomputed every step")
    for x, r in zip(left, rows, strict=True):
        if r.speedup_vs_full and r.epoch_seconds and r.name != "full fine-tuning":
            ax.text(x, r.epoch_seconds, f"{r.speedup_vs_full:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r.name for r in rows])
    ax.set_ylabel(f"seconds per epoch ({report.samples:,} items)")
    ax.set_title(f"{report.model}: epoch time (labels: speedup vs full fine-tuning)", fontsize=10)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, report.machine, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: BenchReport, prefix: str, *, with_plot: bool = True) -> list[str]:
    """Write ``prefix.md``, ``prefix.json`` and (``with_plot``) ``prefix.png``; return the paths written."""
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    paths = [prefix + ".md", prefix + ".json"]
    with open(paths[0], "w") as f:
        f.write(report.markdown())
    with open(paths[1], "w") as f:
        json.dump(report.to_json(), f, indent=1, default=lambda v: None if v is None else str(v))
    if with_plot:
        plot(report, prefix + ".png")
        paths.append(prefix + ".png")
    return paths


# -- the command ---------------------------------------------------------------------------


def _parse_depths(text: str) -> list[float | str]:
    """``0,25,50%,0.75,head,layer3``: numbers above 1 are percentages; other words are split point names."""
    out: list[float | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part in ("head", "head-only"):
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
                           log=lambda m: print(m, file=sys.stderr, flush=True))
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
                        "1 or 'head' = every block, or split point names such as layer3 "
                        "(default 0,25,50,75,head)")
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
