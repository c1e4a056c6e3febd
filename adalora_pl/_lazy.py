"""Lazy exports for the package ``__init__`` files (PEP 562).

A package's ``__init__`` runs before any of its submodules, so an ``__init__`` that imported every public object
would make ``import adalora_pl.layers`` load the callback and Lightning, and a DataModule that only needs
``adalora_pl.io.pretrained`` load the adapter files and the allocator. Instead each ``__init__`` names its public
objects and the submodule that defines each, and :func:`lazy_exports` gives it a module-level ``__getattr__`` that
imports that submodule on the first access to one of its names (``from adalora_pl import SVDLinear`` costs what
``adalora_pl.layers`` costs). ``tests/core/test_architecture.py`` checks what each import really loads.

Stdlib only: this module is imported by ``adalora_pl/__init__.py`` itself.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose public names are given by submodule.

    ``__getattr__`` imports a name's submodule on first access and stores the object in the package's namespace,
    so later lookups are plain attribute reads. Any other name raises the usual ``AttributeError``, which is also
    what lets ``from package import submodule`` fall back to importing the submodule.

    Args:
        package: the package's ``__name__``.
        exports: ``{submodule: names it defines}``, submodules by full dotted name.

    Returns:
        ``(__all__, __getattr__, __dir__)``, to be bound at the package's module level under those names.

    Raises:
        ValueError: a name is listed under two submodules (one of them would silently win).
    """
    owner: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in owner:
                raise ValueError(f"{package}: {name!r} is exported from both {owner[name]} and {module}")
            owner[name] = module

    def __getattr__(name: str) -> Any:
        module = owner.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | owner.keys())

    return sorted(owner), __getattr__, __dir__
