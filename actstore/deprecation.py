"""Old names kept working for a while: keyword arguments and module attributes renamed, with a warning.

Every rename is listed in CHANGELOG.md; a deprecated name warns with :class:`DeprecationWarning` naming its
replacement, and is removed in a later minor version.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["moved_attributes", "renamed_arguments"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword argument ``old=`` as its new name (``renamed_arguments(old="new")``), warning.

    Passing both the old and the new name raises :class:`TypeError`.
    """

    def wrap(func: F) -> F:
        where = func.__qualname__.removesuffix(".__init__")

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
                    warnings.warn(f"{where}: {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def moved_attributes(module: str, aliases: Mapping[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old names: ``aliases[old] = (new name for the message, getter)``."""

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, get = aliases[name]
            warnings.warn(f"{module}.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
