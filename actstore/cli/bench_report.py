"""``actstore bench``'s results: the table rows, the report (Markdown, JSON), the plot and the machine line."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BenchReport", "BenchRow", "machine_description", "plot", "write"]


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
    augmentations: int = 1  #: stored augmentations per item (1: trained without augmentation)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        cols = ["variant", "split after", "frozen blocks", "trainable params", "s/epoch", "recompute s/epoch",
                "precompute s", "disk MB", "speedup vs full", "speedup vs recompute", "break-even vs recompute",
                "break-even vs full"]
        if self.augmentations > 1:  # the same numbers, named for what they compare
            cols[-2:] = ["break-even vs recompute + on-the-fly augment", "break-even vs full + on-the-fly augment"]
            cols[6] = f"precompute s ({self.augmentations} augmentations)"
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
