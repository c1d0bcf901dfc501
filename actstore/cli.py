"""The ``actstore`` command (also ``python -m actstore``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .errors import StoreError

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from .store import open as open_store

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
        extra = ("  ragged" if f["ragged"] else "") + (f"  {f['compression']}" if f.get("compression") else "")
        print(f"  {name:<20} {f['dtype']:<9} {shape}{extra}")
    for name, n in info["views"].items():
        print(f"view         {name} ({n:,} entries)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store import open as open_store

    with open_store(args.path) as store:
        report = store.verify(progress=not args.quiet)
    print(f"OK: {report.rows:,} rows, {report.files} files, {_human(report.bytes)} checked")
    return 0


AddArguments = Callable[[argparse.ArgumentParser], None]
#: Subcommand name -> (function adding its arguments and ``func`` default, help).
COMMANDS: dict[str, tuple[AddArguments, str]] = {}


def command(name: str, help: str) -> Callable[[AddArguments], AddArguments]:
    """Register a subcommand: decorate a function that adds its arguments and sets ``func``."""

    def deco(add: AddArguments) -> AddArguments:
        COMMANDS[name] = (add, help)
        return add

    return deco


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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="actstore", description="Layer recycling with an on-disk activation store.")
    parser.add_argument("--version", action="version", version=f"actstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _load_plugins()
    for name, (add, help) in COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help))
    return parser


def _load_plugins() -> None:
    """Import modules that register more subcommands (kept out of import time of the package)."""
    import importlib

    for module in ("actstore.precompute", "actstore.bench", "actstore.remote"):
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken optional command must not take info/verify down with it
            print(f"actstore: the commands of {module} are unavailable ({type(e).__name__}: {e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StoreError as e:
        print(f"actstore {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"actstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
