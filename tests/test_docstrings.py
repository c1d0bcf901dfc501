"""Every public name has a docstring: the API reference (docs/api.md) is generated from them.

Public: each name in ``actstore.__all__`` and, for the classes among them, each public method, property,
classmethod and staticmethod that actstore itself defines (inherited members of torch, numpy or builtin bases
document themselves there).
"""

from __future__ import annotations

import inspect
from typing import Any

import actstore

NOT_DOCUMENTABLE = {"__version__", "FORMAT_VERSION"}  # plain values: documented in the API page's text


def own_doc(obj: Any) -> str | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return obj.__doc__ if obj is not None else None


def public_members(cls: type) -> list[tuple[str, Any]]:
    out = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("actstore"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or any(name in vars(k) for k in cls.__mro__[: cls.__mro__.index(klass)]):
                continue
            if inspect.isfunction(member) or isinstance(member, (property, staticmethod, classmethod)):
                out.append((f"{klass.__name__}.{name}", member))
    return out


def missing_docstrings() -> list[str]:
    missing = []
    for name in actstore.__all__:
        if name in NOT_DOCUMENTABLE:
            continue
        obj = getattr(actstore, name)
        if not (obj.__doc__ or "").strip():
            missing.append(f"actstore.{name}")
        if inspect.isclass(obj):
            missing += [f"actstore.{qual}" for qual, member in public_members(obj)
                        if not (own_doc(member) or "").strip()]
    return sorted(set(missing))


def test_every_public_name_has_a_docstring() -> None:
    missing = missing_docstrings()
    assert not missing, f"public names without a docstring (the API reference shows them empty): {missing}"


def test_the_check_sees_a_missing_docstring() -> None:
    class Store:
        def documented(self) -> None:
            """Yes."""

        def bare(self) -> None:
            pass

        @property
        def size(self) -> int:
            return 0

    Store.__module__ = "actstore.fake"
    names = {q for q, m in public_members(Store) if not (own_doc(m) or "").strip()}
    assert names == {"Store.bare", "Store.size"}


def test_every_public_name_is_in_the_api_reference() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    absent = [name for name in actstore.__all__ if name != "__version__" and f"::: actstore.{name}\n" not in text]
    assert not absent, f"docs/api.md has no '::: actstore.NAME' entry for {absent}"
