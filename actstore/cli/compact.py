"""The ``compact`` command: merge a store's segments into one (optionally dropping rows no view references)."""

from __future__ import annotations

import argparse

from actstore.cli.registry import command
from actstore.engine.lifecycle.reclaim import unreferenced_rows


def cmd_compact(args: argparse.Namespace) -> int:
    from actstore.store import open as open_store

    with open_store(args.path, mode="a") as store:  # the writer lock: StoreLockedError names its holder
        drop = unreferenced_rows(store.snapshot) if args.drop_unreferenced else None
        report = store.compact(drop=drop)
    print(f"{args.path}: {report}")
    return 0


@command("compact", "merge a store's segments into one (row numbers, keys and views unchanged unless "
                    "--drop-unreferenced)")
def _compact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the store: a directory or a URL (s3://bucket/prefix)")
    p.add_argument("--drop-unreferenced", action="store_true",
                   help="also drop every row that no view references, renumbering the rows (views and key index "
                        "rewritten in the same commit). Rows written without a view (store.append, a "
                        "RecycledEncoder's cache) are dropped too; precompute's own reclaim only drops rows its "
                        "previous dataset view referenced. Default: keep every row")
    p.set_defaults(func=cmd_compact)
