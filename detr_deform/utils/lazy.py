"""Packages whose public names are imported on first use (PEP 562).

``import detr_deform.models.config`` runs ``detr_deform/models/__init__.py`` first; if that
imported the models, every light module below it (the configuration schema, which every
tool's ``--help`` needs) would pay for torch and torchvision. With :func:`lazy_exports`
a package's ``__init__`` names its exports and imports each one when it is first read.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to the
    module that defines it; a name that is a subpackage or module of ``package`` is imported too."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            if importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
