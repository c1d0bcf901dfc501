"""The ``actstore infer`` command: run a trained head over a store's rows into a new store."""

from __future__ import annotations

import argparse
import sys

from torch import nn

from actstore.cli.factories import call_factory
from actstore.cli.registry import command
from actstore.errors import FactoryError
from actstore.training.inference import infer


def cmd_infer(args: argparse.Namespace) -> int:
    try:
        made = call_factory(args.head, "--head")
        head, frozen = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(head, nn.Module) or not (frozen is None or isinstance(frozen, (nn.Module, str))):
            raise FactoryError(f"--head: {args.head} returned {type(made).__name__}; expected the trained head (a "
                               "torch.nn.Module) or a (head, frozen part or its fingerprint) pair")
    except FactoryError as e:
        print(f"actstore infer: error: {e}", file=sys.stderr)
        return 2
    if frozen is None and not args.no_check:
        print("actstore infer: error: --head must return (head, frozen part) so that the store can be checked "
              "against the layers that computed it, or pass --no-check", file=sys.stderr)
        return 2
    try:
        out = infer(head, args.store, args.field, frozen=frozen, batch_size=args.batch_size,
                    num_workers=args.workers, progress=not args.quiet, out=args.out, out_field=args.out_field,
                    store_dtype=args.dtype, check_fingerprint=not args.no_check, overwrite=args.overwrite)
    except (KeyError, TypeError) as e:
        print(f"actstore infer: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.out}: {len(out):,} rows of {args.out_field!r}")  # type: ignore[arg-type]
    out.close()  # type: ignore[union-attr]
    return 0


@command("infer", "run a trained head over every row of a store and write its outputs to a new store")
def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", required=True, metavar="MODULE:FACTORY",
                   help="callable returning (head, frozen part from actstore.split); MODULE may be a .py path")
    p.add_argument("--store", required=True, metavar="PATH", help="the store the frozen part computed")
    p.add_argument("--field", help="the head's input field (default: the store's only activation field)")
    p.add_argument("--out", required=True, metavar="PATH", help="the new store of outputs (same keys)")
    p.add_argument("--out-field", default="output", help="field name of the outputs (default: output)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype on disk (default: the output's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-check", action="store_true", help="do not check the store's fingerprint")
    p.add_argument("--overwrite", action="store_true", help="replace a store at --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_infer)
