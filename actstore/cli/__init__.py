"""The ``actstore`` command (also ``python -m actstore``)."""

from __future__ import annotations

import argparse
import sys

from actstore.cli.registry import COMMANDS
from actstore.errors import StoreError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from actstore import __version__

    parser = argparse.ArgumentParser(prog="actstore", description="Layer recycling with an on-disk activation store.")
    parser.add_argument("--version", action="version", version=f"actstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _load_plugins()
    for name, (add, help) in COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help))
    return parser


def _load_plugins() -> None:
    """Import the modules that define the subcommands (each registers itself in :mod:`actstore.cli.registry`)."""
    import importlib

    for module in ("actstore.cli.store", "actstore.cli.precompute", "actstore.cli.bench", "actstore.cli.compact",
                   "actstore.cli.infer"):
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
