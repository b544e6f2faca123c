"""``require``: the explicit check of the GPU kit and the kernel checks.

A bare ``assert`` disappears under ``python -O`` / ``PYTHONOPTIMIZE`` (which every
subprocess inherits), so a check written with it would pass without checking.
``require`` always runs. ``CheckFailed`` derives from AssertionError so that
pytest and the kit's runners report it like a failed assertion.
"""
from __future__ import annotations

from collections.abc import Callable


class CheckFailed(AssertionError):
    """A check of the GPU kit or of the kernel emulation found a wrong result."""


def require(condition: object, message: object | Callable[[], object] = "check failed") -> None:
    """Raises CheckFailed(message) unless ``condition`` is true; ``message`` may be a callable
    (evaluated only on failure) or any object (formatted with str)."""
    if not condition:
        raise CheckFailed(str(message() if callable(message) else message))
