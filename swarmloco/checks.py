"""Checks of config values, shared by every config section: a refused value is a :class:`ConfigError` that names
the field as the TOML file does and shows the value as it is written there.

The run's sections (:mod:`swarmloco.config`), the outer step's (:mod:`swarmloco.outer_optim.config`) and each
codec's settings (:mod:`swarmloco.compression`) all check their fields here, so an error reads the same
whichever room the section lives in. This module imports nothing of swarmloco.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = [
    "ConfigError", "show_value", "check", "is_number", "is_int", "check_positive", "check_non_negative",
    "check_in_range", "check_bool", "check_sha256", "plain_table",
]


class ConfigError(ValueError):
    """A config value is refused: ``field`` (dotted, as in the TOML file), the ``value``, and ``why``."""

    def __init__(self, field: str, value: Any, why: str):
        super().__init__(f"config: {field} = {show_value(value)} is invalid: {why}")
        self.field, self.value, self.why = field, value, why


def show_value(value: Any) -> str:
    """A value as the user wrote it in TOML (not as a Python repr: lists, not tuples; true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return str(value)


def check(cond: bool, name: str, value: Any, why: str) -> None:
    """Raise ``ConfigError(name, value, why)`` unless ``cond``."""
    if not cond:
        raise ConfigError(name, value, why)


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int (a bool is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name: str, value: float) -> None:
    check(is_number(value) and value > 0, name, value, "must be a number > 0")


def check_non_negative(name: str, value: float) -> None:
    check(is_number(value) and value >= 0, name, value, "must be a number >= 0")


def check_in_range(name: str, value: Any, lo: float, hi: float, closed_hi: bool = False) -> None:
    """A number in [lo, hi), or [lo, hi] with ``closed_hi``."""
    ok = is_number(value) and lo <= value and (value <= hi if closed_hi else value < hi)
    check(ok, name, value, f"must be a number in [{lo:g}, {hi:g}{']' if closed_hi else ')'}")


def check_bool(name: str, value: Any) -> None:
    check(isinstance(value, bool), name, value, "must be true or false")


_SHA256_HEX = frozenset("0123456789abcdef")


def check_sha256(name: str, value: Any) -> None:
    check(isinstance(value, str) and (value == "" or (len(value) == 64 and set(value) <= _SHA256_HEX)), name, value,
          "must be empty or a sha256 as 64 lowercase hex chars")


def plain_table(name: str, value: Any) -> Any:
    """A deep copy of a TOML-like value (tuples become lists), or a ConfigError naming the first bad entry."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            check(isinstance(key, str) and key != "", name, key, "table keys must be non-empty strings")
            out[key] = plain_table(f"{name}.{key}", item)
        return out
    if isinstance(value, (list, tuple)):
        return [plain_table(f"{name}[{i}]", item) for i, item in enumerate(value)]
    check(isinstance(value, (str, int, float, bool)) and (not isinstance(value, float) or math.isfinite(value)),
          name, value, "must be a string, number, boolean, list or table")
    return value
