"""Kinds of values: how an option's text is read and which values it allows.

One `Kind` per option serves its command-line and config-file parsing, its validation (one line
naming the value and what is allowed) and its help text. The optimizer's options
(`lordo.optim.options`) and the run's config (`lordo.config`) both describe their fields with
these; this module imports nothing of lordo.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NONE_WORDS = ("none", "null", "~")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the one-line ValueError naming a bad value and what is allowed, unless ok."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def read_int(text: str) -> int:
    """'8', '1_000', '1e3' (an integral float as people write it)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def read_bool(text: str) -> bool:
    words = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}
    return words[text.lower()]


@dataclass(frozen=True)
class Kind:
    """A field's values: `read` turns text as typed into a value, `ok` accepts a value, `allowed`
    says which."""

    read: Callable[[str], Any]
    ok: Callable[[Any], bool]
    allowed: str
    none: str | None = None      # what None means, when None is allowed

    def parse(self, value: Any) -> Any:
        """Text (command line; a YAML scalar such as '3e-3' that YAML 1.1 leaves a string) read as
        this kind; other values as given. Text that does not read stays text, for `check` to
        name it."""
        if not isinstance(value, str):
            return value
        if self.none and value.strip().lower() in NONE_WORDS:
            return None
        if self.read is str:
            return value
        try:
            return self.read(value.strip())
        except (ValueError, KeyError, OverflowError):
            return value

    def check(self, value: Any) -> bool:
        return self.none is not None if value is None else self.ok(value)

    def describe(self) -> str:
        return f"{self.allowed}, or None ({self.none})" if self.none else self.allowed


def integer(low: int, high: int | None = None, none: str | None = None) -> Kind:
    return Kind(read_int, lambda v: is_int(v) and v >= low and (high is None or v <= high),
                f"an int >= {low}" if high is None else f"an int in [{low}, {high}]", none)


def number(low: float, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False, none: str | None = None) -> Kind:
    def ok(v: Any) -> bool:
        return is_number(v) and math.isfinite(v) and (v > low if open_low else v >= low) and \
            (high is None or (v < high if open_high else v <= high))
    if high is None:
        allowed = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        allowed = (f"a number in {'(' if open_low else '['}{low:g}, {high:g}"
                   f"{')' if open_high else ']'}")
    return Kind(float, ok, allowed, none)


def choice(options: tuple[str, ...] | list[str], none: str | None = None) -> Kind:
    return Kind(str, lambda v: v in options, f"one of {list(options)}", none)


def text(allowed: str, pattern: str = r".+", none: str | None = None) -> Kind:
    return Kind(str, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None,
                allowed, none)


def flag(none: str | None = None) -> Kind:
    return Kind(read_bool, lambda v: isinstance(v, bool), "true or false", none)
