"""Declared checks of configuration dataclass fields: each field's type (from
its annotation), its allowed choices and its bounds, checked by one function
so that every configuration (Hydra, a checkpoint's stored config, code) gets
the same one-line messages::

    backbone: str = choice(("resnet18", "resnet34", "resnet50", ...), default="resnet50")
    dropout: float = bounded(0.1, ge=0, lt=1)
"""
from __future__ import annotations

import dataclasses
import difflib
import operator
import types
import typing
from collections.abc import Sequence
from typing import Any


def choice(choices: Sequence[Any], default: Any) -> Any:
    """A field whose value must be one of ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field (or list of numbers) within bounds; ``None`` values are not bounded."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


def check_fields(config: Any, prefix: str) -> None:
    """Raises ValueError naming ``prefix.field``, the value and what is allowed,
    for the first field of the dataclass ``config`` that breaks its declaration."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}.{f.name}"
        expected = hints.get(f.name, Any)
        if not _has_type(value, expected):
            raise ValueError(f"{key}={value!r:.80} has type {type(value).__name__}; expected {_type_name(expected)}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ValueError(f"{key}={value!r:.80} is not allowed; choose one of {', '.join(map(str, choices))}"
                             f"{_did_you_mean(value, choices)}")
        bounds = f.metadata.get("bounds")
        if bounds and value is not None:
            for item in value if isinstance(value, list) else [value]:
                _check_bounds(key, value, item, bounds)


_RULES = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _check_bounds(key: str, value: Any, item: float, bounds: dict[str, float]) -> None:
    # Written so that NaN (every comparison False) is out of range too.
    if not all(test(item, bounds[name]) for name, (test, _) in _RULES.items() if name in bounds):
        allowed = " and ".join(f"{symbol} {bounds[name]:g}" for name, (_, symbol) in _RULES.items() if name in bounds)
        what = "every entry must be" if isinstance(value, list) else "must be"
        raise ValueError(f"{key}={value!r:.80} is out of range: {what} {allowed}")


def _did_you_mean(value: Any, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or an empty string."""
    return _did_you_mean(name, known)


def _has_type(value: Any, expected: Any) -> bool:
    if expected is Any:
        return True
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(expected) or (Any,)
        return isinstance(value, (list, tuple)) and all(_has_type(v, item_type) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(expected)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(expected, "__name__", str(expected))
