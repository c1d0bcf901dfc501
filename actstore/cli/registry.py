"""The subcommand registry of the ``actstore`` command."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["COMMANDS", "command"]

AddArguments = Callable[[argparse.ArgumentParser], None]
#: Subcommand name -> (function adding its arguments and ``func`` default, help).
COMMANDS: dict[str, tuple[AddArguments, str]] = {}


def command(name: str, help: str) -> Callable[[AddArguments], AddArguments]:
    """Register a subcommand: decorate a function that adds its arguments and sets ``func``."""

    def deco(add: AddArguments) -> AddArguments:
        COMMANDS[name] = (add, help)
        return add

    return deco
