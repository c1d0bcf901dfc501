"""``actstore bench``'s measurement: depths, the default loss, and the interleaved timing of every variant.

:func:`run_bench` is the whole measurement (what ``actstore bench`` prints is
its :class:`~actstore.cli.bench_report.BenchReport`); the command line, in
:mod:`actstore.cli.bench`, only parses arguments, loads the factories and
writes the report.  torch is imported lazily.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actstore.cli.bench_report import BenchReport, BenchRow, machine_description
from actstore.errors import BenchError

__all__ = ["DEFAULT_DEPTHS", "default_loss", "is_oom", "run_bench"]

#: The default depths: fractions of the blocks frozen (0: the stem only; 1: every block, the row "100%").
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
    from actstore.models.blocks import Frozen as BertFrozen
    from actstore.models.capture import model_arguments

    if isinstance(module, BertFrozen) and isinstance(batch, Mapping):
        return module(batch)
    args, kwargs = model_arguments(module, batch)
    return module(*args, **kwargs)


def _takes_mask(head: Any) -> bool:
    from actstore.models.blocks import Head as BertHead
    from actstore.models.split import SentenceTransformerHead

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
    from actstore.models.split import plan_split as _plan
    from actstore.models.split import resolve_at as _resolve_at
    from actstore.models.split import split_points

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
                label = f"{round(d * 100)}%"  # 1.0 is "100%": what follows the last block trains, if anything
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
              progress: bool = True, name: str | None = None, log: Callable[[str], None] = print,
              augment: Callable[[Any, Any], Any] | None = None, augmentations: int = 1) -> BenchReport:
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
    augment, augmentations
        Training with augmentation: full fine-tuning and recompute augment each
        batch on the fly (``augment(input, generator)``), recycling precomputes
        ``augmentations`` stored augmentations per item (``K`` times the
        precompute and the disk) and serves one per step; the break-even is
        then against full fine-tuning with on-the-fly augmentation.

    Returns
    -------
    BenchReport
    """
    import torch

    if batch_size < 1 or min_batch_size < 1:
        raise BenchError("batch_size and min_batch_size must be positive")
    if len(data) < 1:
        raise BenchError("the data sample is empty")
    if (augment is None) != (augmentations == 1) or augmentations < 1:
        raise BenchError(f"augment and augmentations go together: an augment with augmentations >= 2, or neither "
                         f"(got augment={'a function' if augment else None}, augmentations={augmentations})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family, n_blocks, resolved = _depths(model, depths)
    bs = min(batch_size, len(data))
    while True:
        try:
            return _run(model, data, collate_fn, loss_fn or default_loss(), resolved, family, n_blocks, bs,
                        steps, rounds, store_dtype, dev, workdir, progress, name or type(model).__name__, log,
                        augment, augmentations)
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
         workdir: str | None, progress: bool, name: str, log: Callable[[str], None], augment: Any = None,
         augmentations: int = 1) -> BenchReport:
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

    drawn = [0]

    def make_batch(idx: list[int]) -> Any:
        if augment is None:
            return _to(collate([inputs[i] for i in idx]), dev)
        drawn[0] += 1  # on-the-fly augmentation: a new generator state every batch, its cost in the step
        gen = torch.Generator().manual_seed(drawn[0])
        return _to(collate([augment(inputs[i], gen) for i in idx]), dev)

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
                store_dtype=store_dtype, progress=progress, overwrite=True, augment=augment,
                augmentations=augmentations))
            row.precompute_seconds = time.perf_counter() - t0
            stores.append(store)
            row.disk_bytes = int(store.info()["bytes_on_disk"])
            if not head_params:
                row.note = ("nothing left to train: what follows the split has no trainable parameters; "
                            "a new head on this output is the main job's 'head only'")
                continue
            field_name = next(f for f in store.fields if not f.startswith("item_"))
            ds = ActivationDataset(store, fields=[field_name])
            rows_of = store.view("dataset").reshape(n, augmentations)
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
                drawn[0] += 1  # one stored augmentation per step (as an epoch serves one per item)
                got = gather(ds.__getitems__(rows_of[idx, drawn[0] % augmentations].tolist()))[field_name]
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

    notes = [f"actstore {__version__}."]
    if augment is not None:
        notes.append(f"Augmentation: full fine-tuning and recompute augment every batch on the fly; recycling "
                     f"precomputed {augmentations} stored augmentations per item ({augmentations}x the precompute "
                     f"and the disk of one) and serves one per item per epoch, so after {augmentations} epochs they "
                     "repeat. Break-even vs full: against full fine-tuning with on-the-fly augmentation.")

    report = BenchReport(
        model=name, family=family, blocks=n_blocks, samples=n, batch_size=bs, steps_per_epoch=steps_per_epoch,
        steps=n_steps, rounds=rounds, device=str(dev), store_dtype=store_dtype, machine=machine_description(), rows=rows,
        step_seconds=median, wall_seconds=time.perf_counter() - started, notes=notes,
        augmentations=augmentations)
    return report
