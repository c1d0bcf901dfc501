"""Commands on one store: ``info``, ``verify``, ``push``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from actstore.cli.registry import command


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from actstore.store import open as open_store

    with open_store(args.path) as store:
        info = store.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store        {info['path']}")
    print(f"format       {info['format']}")
    print(f"rows         {info['rows']:,}")
    print(f"on disk      {_human(info['bytes_on_disk'])}")
    print(f"fingerprint  {info['fingerprint'] or '-'}")
    print(f"created      {info['created']}")
    print(f"commits      {info['generation']} ({info['segments']} segments, {info['index_runs']} index runs)")
    print(f"chunks       {info['layout']}; inner chunks of ~{_human(info['chunk_bytes'])} for other Zarr readers")
    print("fields")
    for name, f in info["fields"].items():
        shape = "(" + ", ".join("*" if d is None else str(d) for d in f["shape"]) + ")"
        extra = ("  ragged" if f["ragged"] else "") + (f"  {f['compression']}" if f.get("compression") else "") \
            + (f"  quantised {f['quantize']}" if f.get("quantize") else "")
        print(f"  {name:<20} {f['dtype']:<9} {shape}{extra}")
    for name, n in info["views"].items():
        print(f"view         {name} ({n:,} entries)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from actstore.store import open as open_store

    with open_store(args.path) as store:
        report = store.verify(progress=not args.quiet)
    print(f"OK: {report.rows:,} rows, {report.files} files, {_human(report.bytes)} checked")
    return 0


@command("info", "show rows, fields, size, fingerprint and layout of a store")
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


@command("verify", "check every byte of a store against its checksums (exit 1 on damage)")
def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)


def cmd_push(args: Any) -> int:
    from actstore.store import push

    n = push(args.path, args.url, cache_dir=args.cache_dir)
    print(f"pushed {n:,} new rows to {args.url}")
    return 0


def _push_args(p: Any) -> None:
    p.add_argument("path", help="the local store")
    p.add_argument("url", help="s3://bucket/prefix (credentials and endpoint from AWS_* environment variables)")
    p.add_argument("--cache-dir", help="local staging/cache directory (default ~/.cache/actstore/...)")
    p.set_defaults(func=cmd_push)


command("push", "upload a local store to object storage (or add its rows to a remote store)")(_push_args)
