"""The FAQ study's row trained through ``SentenceTransformerTrainer`` with ``actstore.recycle``, and its step timing.

:func:`train_st_recycled` trains the model the way a sentence-transformers user
does (``SentenceTransformerTrainer``, the symmetric multiple-negatives ranking
loss on (anchor, positive) columns), with the one line
``model = actstore.recycle(model, at, store)`` before the trainer: the first
epoch runs the frozen blocks and fills the store, the later ones read it.  The
settings follow the study's other rows (AdamW with weight decay 0.01, 10%
linear warm-up then linear decay, full batches only, scale 20); the batches
are the trainer's own (its seeded sampler), not the study's.

:func:`time_st_steps` times training steps of that trainer, recycled (every
text stored: all hits) against full fine-tuning in the same trainer, on the
same collated batches, interleaved over rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import actstore
from actstore.examples.faq.data import Pairs
from actstore.examples.faq.loops import count_params, evaluate_model, record_epoch
from actstore.examples.faq.metrics import RowResult
from actstore.examples.faq.model import blocks_frozen

__all__ = ["time_st_steps", "train_st_recycled"]


def _trainer(model: Any, train: Pairs, *, out_dir: str, epochs: int, batch_size: int, lr: float, seed: int,
             progress: bool, callbacks: list[Any] = ()) -> Any:  # type: ignore[assignment]
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=epochs, learning_rate=lr,
        weight_decay=0.01, warmup_steps=0.1, lr_scheduler_type="linear", dataloader_drop_last=True, seed=seed,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=not progress)
    columns = {"anchor": list(train.questions), "positive": list(train.answers)}
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(columns),
                                      loss=losses.MultipleNegativesSymmetricRankingLoss(model, scale=20.0),
                                      callbacks=list(callbacks))


def train_st_recycled(model: Any, train: Pairs, val: Pairs, *, at: float, store_path: str, epochs: int,
                      batch_size: int, lr: float, store_dtype: str = "float16", seed: int = 0, progress: bool = True,
                      name: str | None = None, log: Callable[[str], None] = print) -> RowResult:
    """Train ``model`` with ``SentenceTransformerTrainer``, recycled at ``at`` into ``store_path``; evaluate.

    The model is closed (store committed, plain class back) before it is
    evaluated, so evaluation runs the plain model.  ``row.epoch_seconds`` holds
    each epoch's wall time: the first fills the store, the later ones read it.
    """
    import transformers

    row = RowResult(name or f"{round(at * 100)}% recycle + SentenceTransformerTrainer",
                    frozen_blocks=blocks_frozen(model, at), epochs=epochs)
    model = actstore.recycle(model, at, store_path, store_dtype=store_dtype)  # the one line
    row.trainable_params = count_params([p for p in model.parameters() if p.requires_grad])
    stats: list[dict[str, int]] = []

    class Epochs(transformers.TrainerCallback):
        t0 = 0.0
        losses: list[float] = []

        def on_epoch_begin(self, *a: Any, **kw: Any) -> None:
            self.t0, self.losses = time.perf_counter(), []

        def on_log(self, *a: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_epoch_end(self, *a: Any, **kw: Any) -> None:
            row.epoch_seconds.append(time.perf_counter() - self.t0)
            stats.append(dict(model.recycle_stats))
            record_epoch(row, self.losses, log)
            log(f"  {row.name}: epoch {len(stats)} in {row.epoch_seconds[-1]:.0f} s, recycle_stats {stats[-1]}")

    with tempfile.TemporaryDirectory(prefix="st-trainer-") as out:
        trainer = _trainer(model, train, out_dir=out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           progress=progress, callbacks=[Epochs()])
        trainer.train()
    model.close()
    evaluate_model(model, val, row)
    log(f"  {row.name}: RP@1 {row.rp1:.4f}, RRK {row.rrk:.4f}")
    return row


def time_st_steps(model_factory: Callable[[], Any], train: Pairs, *, at: float, store_path: str, batch_size: int,
                  steps: int, rounds: int, lr: float = 2e-5, progress: bool = False) -> dict[str, Any]:
    """Median seconds per ``SentenceTransformerTrainer`` step: recycled (all hits) and full fine-tuning, interleaved.

    Wall time (``recycled_step_s``, ``full_step_s``, ``speedup``) and the
    median of the rounds' paired process-CPU-time ratios (``cpu_speedup``: on a
    loaded machine the steadier figure).

    ``store_path`` must hold every training text at ``at`` (the store
    :func:`train_st_recycled` filled); a miss raises ``RuntimeError``.  Each
    round runs ``steps`` steps of each variant on the same collated batches
    (``trainer.training_step`` and the trainer's optimizer), alternating which
    goes first.
    """
    recycled_model: Any = actstore.recycle(model_factory(), at, store_path)
    full_model = model_factory()
    times: dict[str, list[float]] = {"recycled": [], "full": []}
    cpu: dict[str, list[float]] = {"recycled": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="st-timing-") as out:
        trainers = {k: _trainer(m, train, out_dir=out, epochs=1, batch_size=batch_size, lr=lr, seed=0,
                                progress=progress)
                    for k, m in (("recycled", recycled_model), ("full", full_model))}
        loader = iter(trainers["full"].get_train_dataloader())
        batches = [next(loader) for _ in range(steps)]
        for t in trainers.values():
            t.create_optimizer_and_scheduler(num_training_steps=steps * (rounds + 1))
            t.current_gradient_accumulation_steps = 1  # set by train()'s loop, read by training_step

        def run(kind: str) -> tuple[float, float]:
            t = trainers[kind]
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                t.training_step(t.model, b)
                t.optimizer.step()
                t.lr_scheduler.step()
                t.optimizer.zero_grad()
            return (time.perf_counter() - t0) / len(batches), (time.process_time() - c0) / len(batches)

        run("recycled")  # warm-up (and the store check below)
        run("full")
        if recycled_model.recycle_stats["misses"]:
            raise RuntimeError(f"time_st_steps: {store_path} lacks training texts ({recycled_model.recycle_stats}); "
                               "time after train_st_recycled filled it")
        for r in range(rounds):
            for kind in (("recycled", "full") if r % 2 == 0 else ("full", "recycled")):
                wall, used = run(kind)
                times[kind].append(wall)
                cpu[kind].append(used)
    stats = dict(recycled_model.recycle_stats)
    recycled_model.close()
    rec, full = statistics.median(times["recycled"]), statistics.median(times["full"])
    cpu_speedup = statistics.median(f / r for f, r in zip(cpu["full"], cpu["recycled"], strict=True))
    return {"recycled_step_s": rec, "full_step_s": full, "speedup": full / rec, "cpu_speedup": cpu_speedup,
            "rounds": rounds, "steps": steps, "times": times, "cpu_times": cpu, "recycle_stats": stats}
