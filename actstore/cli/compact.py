"""The ``compact`` command: merge a store's segments into one."""

from __future__ import annotations

import argparse

from actstore.cli.registry import command


def cmd_compact(args: argparse.Namespace) -> int:
    from actstore.store import open as open_store

    with open_store(args.path, mode="a") as store:  # the writer lock: StoreLockedError names its holder
        report = store.compact()
    print(f"{args.path}: {report}")
    return 0


@command("compact", "merge a store's segments into one (row numbers, keys and views unchanged)")
def _compact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the store: a directory or a URL (s3://bucket/prefix)")
    p.set_defaults(func=cmd_compact)
