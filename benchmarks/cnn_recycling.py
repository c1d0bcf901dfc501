#!/usr/bin/env python
"""Speed of layer recycling on a CNN: ResNet-34 at 224x224, as in Quaterion's similar-cars study.

For every recycling level — 0% (the stem: conv1..maxpool), 25% (after
``layer1``), 50% (``layer2``), 75% (``layer3``) and 100% (``layer4``:
``avgpool`` + ``fc`` trained, Quaterion's "head only"; ``actstore bench`` calls
the row ``100%``, reports before 2026-12-07 "head only") — it measures with :func:`actstore.cli.bench.run_bench`:

- the training epoch from the store (recycled),
- the same with the frozen prefix recomputed every step under ``no_grad``,
- full fine-tuning,
- the one-off precompute time and the store's size on disk,

and prints speedups and break-even epochs.  Step times are measured
interleaved (every variant in turn, several rounds, same batches), and epoch
time = median step time x steps per epoch.

Weights and images are random (seeded): the speed of a forward and backward
pass does not depend on the weights' values or the pixels.  The model is
torchvision's ``resnet34`` when torchvision is installed, else the equivalent
ResNet-34 from tests/models.py (BasicBlock, [3, 4, 6, 3], torchvision's attribute
names and forward, 1000 outputs).  The loss is ``actstore bench``'s default
self-supervised target (mean square of a fixed random projection of the
output): its cost is negligible next to the network's.

Usage::

    python benchmarks/cnn_recycling.py            # 256 images, 16 minutes on 2 loaded cores
    python benchmarks/cnn_recycling.py --quick    # 8 images at 112x112, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `actstore` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def resnet34_local(num_classes: int = 1000) -> Any:
    """ResNet-34 with torchvision's layout (so :func:`actstore.models.split.split` splits it) and init, random weights."""
    from torch import nn

    from actstore.testing.models import ResNet

    model = ResNet((3, 4, 6, 3), num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet34(seed: int = 0) -> Any:
    """torchvision's resnet34 (random weights) when installed, else :func:`resnet34_local`."""
    import torch

    torch.manual_seed(seed)
    try:
        from torchvision.models import resnet34 as tv_resnet34
    except ImportError:
        return resnet34_local()
    return tv_resnet34(weights=None)


def images(n: int = 256, size: int = 224, seed: int = 0) -> list[Any]:
    """``n`` random images (3, size, size), float32, seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=gen) for _ in range(n)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 images at 112x112, 1 step per variant (CI)")
    p.add_argument("--images", type=int, help="images in the sample (default 256; quick 8)")
    p.add_argument("--size", type=int, help="image side (default 224; quick 112)")
    p.add_argument("--batch-size", type=int, help="default 32; quick 4")
    p.add_argument("--steps", type=int, help="steps per variant per round (default 3; quick 1)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 2; quick 1)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored activations (default float16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, loaded machine two threads stall each other)")
    p.add_argument("--out", help="results directory (default benchmarks/results; quick: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    q = args.quick
    args.images = args.images or (8 if q else 256)
    args.size = args.size or (112 if q else 224)
    args.batch_size = args.batch_size or (4 if q else 32)
    args.steps = args.steps or (1 if q else 3)
    args.rounds = args.rounds or (1 if q else 2)
    if args.out is None and not q:
        args.out = RESULTS
    return args


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    import torch

    from actstore.cli.bench import run_bench, write

    torch.set_num_threads(args.threads)
    model = resnet34()
    source = "torchvision resnet34" if type(model).__module__.startswith("torchvision") else \
        "ResNet-34 defined in benchmarks/cnn_recycling.py (torchvision not installed)"
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; model: {source}", flush=True)
    data = images(args.images, args.size)
    report = run_bench(model, data, batch_size=args.batch_size, steps=args.steps, rounds=args.rounds,
                       store_dtype=args.dtype, progress=not args.quiet,
                       name=f"ResNet-34, {args.size}x{args.size} images", log=lambda m: print(m, flush=True))
    report.machine = machine()
    report.notes += [
        f"Model: {source}; random weights and random images (speed does not depend on either).",
        "Loss: actstore bench's default (mean square of a fixed random 16-dim projection of the logits).",
        f"torch threads: {args.threads}.",
    ]
    print(report.markdown(), flush=True)
    if args.out:
        try:
            paths = write(report, os.path.join(args.out, "cnn_recycling"))
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)
            paths = [os.path.join(args.out, "cnn_recycling.md")]
        print("wrote " + ", ".join(paths))
    return report


def summary(report: Any) -> str:
    return json.dumps({r.name: r.speedup_vs_full for r in report.rows})


if __name__ == "__main__":
    main()
