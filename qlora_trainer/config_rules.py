"""The kinds of rule a config field's value obeys (:class:`Range`, :class:`OneOf`, ...) and the check of a
YAML value against a field's type annotation (:func:`coerce`).

Each config section lists its fields' rules next to them (``RULES``, field name -> rule, in
``qlora_trainer/config.py``); ``Config.validate`` checks each field against its rule at load time
(before anything heavy is imported) and ``--help-config`` appends each rule's description to the field's
documentation, so the range a user reads is the range that is enforced. Besides its rule, every float must be finite
(``nan``/``inf`` pass YAML and Python comparisons in surprising ways). A field whose annotation is
``X | None`` accepts ``None`` as well (its documentation says what ``None`` means).
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from qlora_trainer.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A number in an interval (``None``: unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: Any) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a few listed values."""

    values: tuple[Any, ...]

    def ok(self, v: Any) -> bool:
        return v in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Pattern:
    """A string matching ``regex`` (fully); ``text`` says what that means to a user."""

    regex: str
    text: str

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class WordOrRange:
    """One of a few words, or an integer in ``range``."""

    words: tuple[str, ...]
    range: Range

    def ok(self, v: Any) -> bool:
        if isinstance(v, str):
            return v in self.words
        return isinstance(v, int) and not isinstance(v, bool) and self.range.ok(v)

    def describe(self) -> str:
        return f"{', '.join(self.words)} or an integer {self.range.describe()}"


NONEMPTY = Pattern(r"(?s)\s*\S.*", "a non-empty string")
AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)

def describe(rule: Any) -> str | None:
    """``Allowed: ...`` text of ``rule`` (None when there is no rule)."""
    return None if rule is None else f"Allowed: {rule.describe()}."


def problem(rule: Any, value: Any) -> str | None:
    """Why ``value`` is not allowed by ``rule`` (None: it is; ``rule`` None: only the checks every value gets)."""
    if value is None:
        return None  # the type check already decided whether None is allowed
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, list) and not value:
        return "must not be empty"
    if rule is None or rule.ok(value):
        return None
    return f"must be {rule.describe()}"


def coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int->float and str numbers where safe."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = f"{where}: {key}: expected {type_name(tp)}, got {value!r}"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>" or origin is getattr(
            types, "UnionType", None):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(bad)
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
    if origin in (list,):
        if not isinstance(value, list):
            raise ConfigError(bad)
        return [coerce(key, v, args[0], where) for v in value] if args else value
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(bad)
        return {str(k): coerce(key, v, args[1], where) for k, v in value.items()} if args else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(bad)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(bad)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(bad)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(bad)
    return value


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin is not None:
        return " | ".join(type_name(a) for a in typing.get_args(tp)) if origin is typing.Union else str(tp)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
