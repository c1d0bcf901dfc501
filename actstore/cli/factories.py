"""``MODULE:FACTORY`` arguments of the command line: load a callable and call it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

from actstore.errors import FactoryError

__all__ = ["call_factory", "load_factory"]


def load_factory(spec: str, option: str) -> Callable[[], Any]:
    """Resolve ``MODULE:FACTORY`` (a module name or a ``.py`` path, and a callable in it)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"{option}: expected MODULE:FACTORY (for example mypkg.models:build), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise FactoryError(f"{option}: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_actstore_factory_{uuid.uuid4().hex[:8]}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise FactoryError(f"{option}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise FactoryError(f"{option}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                raise FactoryError(f"{option}: cannot import module {module_name!r} ({e}); check the name, "
                                   "the current directory and PYTHONPATH") from e
            raise FactoryError(f"{option}: importing {module_name!r} failed: {e}") from e
        except Exception as e:
            raise FactoryError(f"{option}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise FactoryError(f"{option}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FactoryError(f"{option}: {spec} is a {type(factory).__name__}, not a callable factory")
    return factory  # type: ignore[return-value]


def call_factory(spec: str, option: str) -> Any:
    factory = load_factory(spec, option)
    try:
        return factory()
    except Exception as e:
        raise FactoryError(f"{option}: the factory {spec} failed: {type(e).__name__}: {e}") from e
