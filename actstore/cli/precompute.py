"""The ``actstore precompute`` command."""

from __future__ import annotations

import argparse
import sys

from torch import nn

from actstore.cli.factories import call_factory
from actstore.cli.registry import command
from actstore.errors import FactoryError, StoreError
from actstore.precompute.api import precompute
from actstore.precompute.config import STORE_DTYPES


def cmd_precompute(args: argparse.Namespace) -> int:
    try:
        made = call_factory(args.model, "--model")
        model, collate = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(model, nn.Module):
            raise FactoryError(f"--model: {args.model} returned {type(made).__name__}; expected a torch.nn.Module "
                               "or a (module, collate_fn) pair")
        dataset = call_factory(args.data, "--data")
    except FactoryError as e:
        print(f"actstore precompute: error: {e}", file=sys.stderr)
        return 2
    layers = None if not args.layer or args.layer == ["none"] else args.layer
    input_sel = int(args.input) if args.input is not None and args.input.lstrip("-").isdigit() else args.input
    try:
        store = precompute(
            model, dataset, args.out, layers=layers, batch_size=args.batch_size, device=args.device,
            collate_fn=collate, store_dtype=args.dtype, compression=args.compression, quantize=args.quantize,
            num_workers=args.workers, progress=not args.quiet,
            input=input_sel, autocast=args.autocast, commit_every_rows=args.commit_every_rows,
            commit_every_seconds=args.commit_every_seconds, overwrite=args.overwrite,
            compact=not args.no_compact, allow_overflow=args.allow_overflow, reclaim=not args.no_reclaim)
    except (ValueError, TypeError) as e:
        if isinstance(e, StoreError):
            raise  # main() reports store errors
        print(f"actstore precompute: error: {e}", file=sys.stderr)
        return 1
    store.close()
    return 0


@command("precompute", "run a frozen model over a dataset once and store its layers' outputs")
def _precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="callable returning the model, or (model, collate_fn); MODULE may be a .py path")
    p.add_argument("--data", required=True, metavar="MODULE:FACTORY", help="callable returning the dataset")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="module name to capture (repeat for several); omit, or 'none', for the model's output")
    p.add_argument("--out", required=True, metavar="PATH", help="the store (created, or resumed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(STORE_DTYPES), help="dtype on disk (default: the output's)")
    p.add_argument("--compression", choices=["zstd"], help="compress activations on disk (default: raw, zero-copy reads)")
    p.add_argument("--no-compact", action="store_true",
                   help="leave the segments of the run's commits as they are (default: merge them into one at the end)")
    p.add_argument("--no-reclaim", action="store_true",
                   help="keep rows that the previous run's dataset view referenced and this one's does not "
                        "(default: the final merge drops them, renumbering rows)")
    p.add_argument("--allow-overflow", action="store_true",
                   help="store outputs beyond --dtype's range (above 65504 for float16) clamped to its largest value "
                        "(default: refuse them with an error naming a dtype that holds them)")
    p.add_argument("--quantize", choices=["int8", "float8_e4m3"],
                   help="store floating activations as codes plus a float32 scale per row/token (about half of "
                        "float16's disk; reads dequantise, see docs/FORMAT.md 4.1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--input", help="tuple position or dict key of the model input in each item")
    p.add_argument("--autocast", action="store_true", help="run the model under autocast")
    p.add_argument("--commit-every-rows", type=int, metavar="N")
    p.add_argument("--commit-every-seconds", type=float, default=60.0, metavar="S")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store at PATH that cannot be resumed (other model, layers or configuration)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_precompute)
