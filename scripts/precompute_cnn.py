#!/usr/bin/env python
"""Precompute a torchvision CNN's activations over an image folder.

The folder holds one subdirectory per class (``root/<class>/<image>``), as for
``torchvision.datasets.ImageFolder``.  Each image is loaded with Pillow,
resized (shorter side ``--resize``), centre-cropped to ``--size`` and
normalised with the ImageNet statistics; the key is computed on that tensor,
so changing the preprocessing never reuses stale rows.  The class index and
the file's path relative to the root are stored beside the activations
(fields ``item_1`` and ``item_2``).

The model is ``torchvision.models.<--arch>``, with weights from a local
``--weights`` file (a state dict; nothing is downloaded).  torchvision is
needed for the model only: the data side (:class:`ImageFolder`) and the run
(:func:`run`) take any CNN.

Example::

    python scripts/precompute_cnn.py --images cars/train --arch resnet34 --weights resnet34.pth \\
        --layer layer3 --out cars-layer3.store --dtype float16
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolder(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``root/<class>/<file>`` images as ``(tensor, class index, relative path)``, classes sorted by name."""

    def __init__(self, root: str, size: int = 224, resize: int | None = None) -> None:
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"{self.root}: no such directory")
        self.classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(self.root, name))):
                for f in sorted(files):
                    if f.lower().endswith(EXTENSIONS):
                        self.samples.append((os.path.relpath(os.path.join(dirpath, f), self.root), label))
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images in class subdirectories ({', '.join(EXTENSIONS)})")
        self.size = size
        self.resize = resize or round(size * 256 / 224)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        rel, label = self.samples[i]
        return self.load(os.path.join(self.root, rel)), label, rel

    def load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.resize / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            w, h = im.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            arr = np.asarray(im, dtype=np.float32) / 255.0
        arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def run(model: torch.nn.Module, dataset: Any, out: str, layers: list[str] | None, **kwargs: Any) -> Any:
    """Precompute ``layers`` of ``model`` over ``dataset``; the class index and path ride along."""
    from actstore.precompute.api import precompute

    return precompute(model, dataset, out, layers=layers, input=0, **kwargs)


def build_model(arch: str, weights: str | None) -> torch.nn.Module:
    """``torchvision.models.<arch>``, with a local state dict; exits with a clear message without torchvision."""
    try:
        import torchvision
    except ImportError:
        raise SystemExit(
            "precompute_cnn: error: torchvision is not installed; it provides the CNN (--arch). Install the "
            "torchvision build that matches your torch, or call run() from this script with your own model."
        ) from None
    factory = getattr(torchvision.models, arch, None)
    if factory is None or not callable(factory):
        raise SystemExit(f"precompute_cnn: error: torchvision.models has no architecture {arch!r}")
    model = factory(weights=None)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    else:
        print("precompute_cnn: warning: no --weights given: the model has random weights", file=sys.stderr)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="image folder: one subdirectory per class")
    p.add_argument("--arch", default="resnet34", help="torchvision.models architecture (default resnet34)")
    p.add_argument("--weights", help="local state-dict file (.pth); nothing is downloaded")
    p.add_argument("--layer", action="append", help="module to capture, e.g. layer3 (repeatable); default: output")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    model = build_model(args.arch, args.weights)  # first: fail fast without torchvision
    dataset = ImageFolder(args.images, size=args.size)
    layers = None if not args.layer or args.layer == ["none"] else args.layer
    try:
        store = run(model, dataset, args.out, layers, batch_size=args.batch_size, store_dtype=args.dtype,
                    device=args.device, num_workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        print(f"precompute_cnn: error: {e}", file=sys.stderr)
        return 1
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
